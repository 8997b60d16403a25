//! Which route a request is: a pure function of method and path.

use http::Method;

use crate::intake::valid_custom_id;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    /// `POST /v1/chat/completions`: deferred or passed through.
    ChatCompletions,
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
            Route::ChatCompletions => "chat_completions",
            Route::Lookup { result: false, .. } => "lookup",
            Route::Lookup { result: true, .. } => "lookup_result",
            Route::Cancel { .. } => "cancel",
            Route::MethodNotAllowed { .. } => "method_not_allowed",
            Route::OtherV1 => "other_v1",
            Route::NotFound => "not_found",
        }
    }
}

pub fn classify(method: &Method, path: &str) -> Route {
    match path {
        "/healthz" => return Route::Healthz,
        "/readyz" => return Route::Readyz,
        "/v1/chat/completions" if method == Method::POST => return Route::ChatCompletions,
        _ => {}
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

/// The file or batch id a Files or Batches API path names
/// (`/v1/files/{id}`, `/v1/files/{id}/content`, `/v1/batches/{id}/cancel`,
/// ...), percent-decoded as the upstream will read it, so an escaped id
/// cannot slip past the check on Ferry's own objects. A segment that does
/// not decode to UTF-8 is returned raw (it cannot equal one of Ferry's ids).
pub fn upstream_object_id(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/v1/files/")
        .or_else(|| path.strip_prefix("/v1/batches/"))?;
    let segment = rest.split('/').next().filter(|s| !s.is_empty())?;
    Some(percent_decode(segment))
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
    fn upstream_object_ids_are_read_from_files_and_batches_paths() {
        for (path, id) in [
            ("/v1/files/file-abc", Some("file-abc")),
            ("/v1/files/file-abc/content", Some("file-abc")),
            ("/v1/files/file-abc/", Some("file-abc")),
            ("/v1/batches/batch_1", Some("batch_1")),
            ("/v1/batches/batch_1/cancel", Some("batch_1")),
            ("/v1/files/file%2Dabc/content", Some("file-abc")),
            ("/v1/files/%66ile-abc", Some("file-abc")),
            ("/v1/files/bad%zz", Some("bad%zz")),
            ("/v1/files/%ff", Some("%ff")),
            ("/v1/files", None),
            ("/v1/files/", None),
            ("/v1/batches", None),
            ("/v1/models/gpt-4o", None),
            ("/v1/filesx/file-abc", None),
        ] {
            assert_eq!(upstream_object_id(path).as_deref(), id, "{path}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(
            classify(&Method::POST, "/v1/chat/completions"),
            Route::ChatCompletions
        );
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
