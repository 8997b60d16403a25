//! Which route a request is: a pure function of method and path.

use http::Method;

use crate::endpoint::Endpoint;
use crate::intake::valid_custom_id;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    /// `POST` to an endpoint a Batch API takes (`/v1/chat/completions`,
    /// `/v1/embeddings`, ...): deferred or passed through.
    Deferrable(Endpoint),
    /// `GET /v1/ferry/requests/{id}` (`result: false`) or `.../result`.
    Lookup {
        id: String,
        result: bool,
    },
    /// `DELETE /v1/ferry/requests/{id}`.
    Cancel {
        id: String,
    },
    /// A Ferry route with the wrong method; `allow` lists the right ones.
    MethodNotAllowed {
        allow: &'static str,
    },
    /// Any other `/v1/...`: passthrough.
    OtherV1,
    NotFound,
}

impl Route {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Deferrable(e) => e.label(),
            Route::Lookup { result: false, .. } => "lookup",
            Route::Lookup { result: true, .. } => "lookup_result",
            Route::Cancel { .. } => "cancel",
            Route::MethodNotAllowed { .. } => "method_not_allowed",
            Route::OtherV1 => "other_v1",
            Route::NotFound => "not_found",
        }
    }
}

/// Whether a call belongs to Anthropic's API family: an Anthropic path
/// (`/v1/messages` and below), or any `/v1/...` call that carries
/// `anthropic-version`, which every Anthropic SDK sends and no OpenAI SDK
/// does (so `/v1/models` from an Anthropic client lists Claude's models).
/// Everything else is OpenAI-shaped.
pub fn is_anthropic(path: &str, has_anthropic_version: bool) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/") || has_anthropic_version
}

pub fn classify(method: &Method, path: &str) -> Route {
    match path {
        "/healthz" => return Route::Healthz,
        "/readyz" => return Route::Readyz,
        _ => {}
    }
    if method == Method::POST
        && let Some(e) = Endpoint::from_path(path)
    {
        return Route::Deferrable(e);
    }
    // Ferry's namespace is never passed through, with or without a slash.
    if path == "/v1/ferry" {
        return Route::NotFound;
    }
    if let Some(rest) = path.strip_prefix("/v1/ferry/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match parts.as_slice() {
            ["requests", id] if valid_custom_id(id) => match *method {
                Method::GET => Route::Lookup {
                    id: (*id).to_owned(),
                    result: false,
                },
                Method::DELETE => Route::Cancel {
                    id: (*id).to_owned(),
                },
                _ => Route::MethodNotAllowed {
                    allow: "GET, DELETE",
                },
            },
            ["requests", id, "result"] if valid_custom_id(id) => match *method {
                Method::GET => Route::Lookup {
                    id: (*id).to_owned(),
                    result: true,
                },
                _ => Route::MethodNotAllowed { allow: "GET" },
            },
            _ => Route::NotFound,
        };
    }
    if path.starts_with("/v1/") {
        return Route::OtherV1;
    }
    Route::NotFound
}

/// Every segment of a passthrough path that could name an upstream file or
/// batch, decoded as an upstream might read it: percent-escapes undone
/// (repeatedly, so `%2566` counts as `f`), an escaped `/` splitting
/// segments, empty and `.` segments dropped. Ferry's own objects are refused
/// when any segment names one, so no spelling of the path (`/v1//files/x`,
/// `/v1/./files/x`, `/v1/files%2Fx`, `/v1/x/../files/x`) slips past the
/// check, whatever normalisation the upstream or a proxy before it applies.
/// Ferry's ids are random, so a segment of an ordinary path never matches.
pub fn object_id_candidates(path: &str) -> Vec<String> {
    let mut decoded = path.to_owned();
    for _ in 0..3 {
        let next = percent_decode(&decoded);
        if next == decoded {
            break;
        }
        decoded = next;
    }
    decoded
        .split('/')
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
        .map(str::to_owned)
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// `wait=S` from a query string, if present and numeric.
pub fn query_wait(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "wait")
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_family_by_path_or_version_header() {
        assert!(is_anthropic("/v1/messages", false));
        assert!(is_anthropic(
            "/v1/messages/batches/msgbatch_1/results",
            false
        ));
        assert!(is_anthropic("/v1/models", true));
        assert!(!is_anthropic("/v1/models", false));
        assert!(!is_anthropic("/v1/messagesx", false));
        assert!(!is_anthropic("/v1/chat/completions", false));
    }

    #[test]
    fn every_spelling_of_an_object_path_yields_its_id() {
        for (path, id) in [
            ("/v1/files/file-abc", "file-abc"),
            ("/v1/files/file-abc/content", "file-abc"),
            ("/v1/files/file-abc/", "file-abc"),
            ("/v1/batches/batch_1", "batch_1"),
            ("/v1/batches/batch_1/cancel", "batch_1"),
            ("/v1/files/file%2Dabc/content", "file-abc"),
            ("/v1/files/%66ile-abc", "file-abc"),
            ("/v1//files/file-abc", "file-abc"),
            ("/v1/./files//file-abc/content", "file-abc"),
            ("/v1/x/../files/file-abc", "file-abc"),
            ("/v1/files%2Ffile-abc", "file-abc"),
            ("/v1/files/%2566ile-abc", "file-abc"),
            ("//v1/batches/batch_1", "batch_1"),
        ] {
            assert!(
                object_id_candidates(path).iter().any(|c| c == id),
                "{path}: {:?}",
                object_id_candidates(path)
            );
        }
        // Undecodable escapes stay raw (they cannot equal one of Ferry's ids).
        assert_eq!(
            object_id_candidates("/v1/files/%ff"),
            ["v1", "files", "%ff"]
        );
        assert_eq!(
            object_id_candidates("/v1/files/bad%zz"),
            ["v1", "files", "bad%zz"]
        );
        assert_eq!(object_id_candidates("/v1/files/"), ["v1", "files"]);
    }

    #[test]
    fn routes() {
        for e in Endpoint::ALL {
            assert_eq!(classify(&Method::POST, e.path()), Route::Deferrable(e));
            assert_eq!(classify(&Method::GET, e.path()), Route::OtherV1);
        }
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions"),
            Route::Deferrable(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Route::Deferrable(Endpoint::ChatCompletions).label(),
            "chat_completions"
        );
        assert_eq!(classify(&Method::POST, "/v1/embeddings/x"), Route::OtherV1);
        assert_eq!(
            classify(&Method::GET, "/v1/chat/completions"),
            Route::OtherV1
        );
        assert_eq!(classify(&Method::GET, "/v1/models"), Route::OtherV1);
        assert_eq!(classify(&Method::POST, "/v1/batches"), Route::OtherV1);
        assert_eq!(
            classify(&Method::GET, "/v1/ferry/requests/abc-1"),
            Route::Lookup {
                id: "abc-1".into(),
                result: false
            }
        );
        assert_eq!(
            classify(&Method::GET, "/v1/ferry/requests/abc-1/result"),
            Route::Lookup {
                id: "abc-1".into(),
                result: true
            }
        );
        assert_eq!(
            classify(&Method::DELETE, "/v1/ferry/requests/abc"),
            Route::Cancel { id: "abc".into() }
        );
        assert_eq!(
            classify(&Method::PUT, "/v1/ferry/requests/abc"),
            Route::MethodNotAllowed {
                allow: "GET, DELETE"
            }
        );
        assert_eq!(classify(&Method::GET, "/v1/ferry"), Route::NotFound);
        assert_eq!(
            classify(&Method::GET, "/v1/ferry/requests/a%20b"),
            Route::NotFound
        );
        assert_eq!(classify(&Method::GET, "/v1/ferry/other"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/healthz"), Route::Healthz);
        assert_eq!(classify(&Method::GET, "/"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/v2/x"), Route::NotFound);
    }

    #[test]
    fn wait_query() {
        assert_eq!(query_wait(Some("wait=30")), Some(30));
        assert_eq!(query_wait(Some("a=1&wait=5")), Some(5));
        assert_eq!(query_wait(Some("wait=x")), None);
        assert_eq!(query_wait(None), None);
    }
}
