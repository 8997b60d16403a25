//! Reading a finished batch's output and error files: one line at a time,
//! matched by `custom_id`, never by position.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::store::{Outcome, RequestError, StoredResult, parse_upstream_custom_id};

#[derive(Debug, Deserialize)]
struct RawLine<'a> {
    custom_id: Option<String>,
    #[serde(default, borrow)]
    response: Option<RawResponse<'a>>,
    #[serde(default)]
    error: Option<RawError>,
}

#[derive(Debug, Deserialize)]
struct RawResponse<'a> {
    status_code: u16,
    /// Kept as text: the body is stored and answered verbatim, never parsed
    /// into a tree here.
    #[serde(default, borrow)]
    body: Option<&'a serde_json::value::RawValue>,
}

#[derive(Debug, Deserialize)]
struct RawError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("line is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("line has no custom_id")]
    MissingCustomId,
    #[error("custom_id `{0}` is not one of Ferry's")]
    ForeignCustomId(String),
    #[error("line has neither a response nor an error")]
    Empty,
}

/// Parses one output- or error-file line into the member it answers and
/// what became of it. An HTTP-level failure (`response.status_code` 4xx/5xx)
/// is still the upstream's answer, so it is `Completed`; `batch_expired`
/// lines are `Expired`; `batch_cancelled` lines are `Cancelled`.
pub fn parse_line(line: &[u8]) -> Result<(u64, Outcome), LineError> {
    let raw: RawLine =
        serde_json::from_slice(line).map_err(|e| LineError::InvalidJson(e.to_string()))?;
    let cid = raw.custom_id.ok_or(LineError::MissingCustomId)?;
    let id = parse_upstream_custom_id(&cid).ok_or(LineError::ForeignCustomId(cid))?;
    if let Some(r) = raw.response {
        let body = r.body.map_or("null", |b| b.get());
        return Ok((
            id,
            Outcome::Completed(StoredResult {
                status_code: r.status_code,
                body: Bytes::copy_from_slice(body.as_bytes()),
            }),
        ));
    }
    let e = raw.error.ok_or(LineError::Empty)?;
    let code = e.code.unwrap_or_else(|| "upstream_error".into());
    let message = e
        .message
        .unwrap_or_else(|| "the upstream gave no answer for this request".into());
    let err = RequestError { code, message };
    Ok((
        id,
        match err.code.as_str() {
            "batch_expired" => Outcome::Expired(err),
            "batch_cancelled" => Outcome::Cancelled(err),
            _ => Outcome::Failed(err),
        },
    ))
}

/// Reads one result file chunk by chunk: every usable line for a member of
/// the batch is handed on; unreadable lines, lines with ids that are not
/// Ferry's and lines for requests outside the batch are counted and skipped,
/// so one bad line never costs the good ones.
pub struct ResultReader<'a> {
    members: &'a HashSet<u64>,
    splitter: LineSplitter,
    /// Lines that could not be used.
    bad_lines: usize,
}

impl<'a> ResultReader<'a> {
    pub fn new(members: &'a HashSet<u64>) -> Self {
        ResultReader {
            members,
            splitter: LineSplitter::default(),
            bad_lines: 0,
        }
    }

    pub fn push(&mut self, chunk: &Bytes, out: &mut impl FnMut(u64, Outcome)) {
        for line in self.splitter.push(chunk) {
            self.line(&line, out);
        }
    }

    /// Handles a last line without a newline; returns the bad-line count.
    pub fn finish(mut self, out: &mut impl FnMut(u64, Outcome)) -> usize {
        if let Some(line) = std::mem::take(&mut self.splitter).finish() {
            self.line(&line, out);
        }
        self.bad_lines
    }

    fn line(&mut self, line: &[u8], out: &mut impl FnMut(u64, Outcome)) {
        match parse_line(line) {
            Ok((id, outcome)) if self.members.contains(&id) => out(id, outcome),
            Ok((id, _)) => {
                self.bad_lines += 1;
                tracing::warn!(
                    request = id,
                    "result line for a request not in this batch; ignored"
                );
            }
            Err(e) => {
                self.bad_lines += 1;
                tracing::warn!(error = %e, "unusable result line; ignored");
            }
        }
    }
}

/// Splits a byte stream into lines across chunk boundaries.
#[derive(Default)]
pub struct LineSplitter {
    pending: BytesMut,
}

impl LineSplitter {
    /// Feeds a chunk; returns the complete lines it finished (without `\n`,
    /// blank lines skipped).
    pub fn push(&mut self, chunk: &Bytes) -> Vec<Bytes> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            let line = self.pending.split_to(pos + 1).freeze();
            let line = line.slice(..line.len() - 1);
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        lines
    }

    /// The last line, when the file does not end with a newline.
    pub fn finish(self) -> Option<Bytes> {
        let rest = self.pending.freeze();
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_failures_are_answers_and_expiry_is_told_apart() {
        let ok = br#"{"id":"batch_req_1","custom_id":"ferry-7","response":{"status_code":200,"request_id":"r","body":{"object":"chat.completion"}},"error":null}"#;
        let (id, o) = parse_line(ok).unwrap();
        assert_eq!(id, 7);
        assert!(matches!(
            o,
            Outcome::Completed(StoredResult {
                status_code: 200,
                ..
            })
        ));
        let http = br#"{"custom_id":"ferry-8","response":{"status_code":429,"body":{"error":{"message":"slow"}}},"error":null}"#;
        assert!(matches!(
            parse_line(http).unwrap().1,
            Outcome::Completed(StoredResult {
                status_code: 429,
                ..
            })
        ));
        let exp = br#"{"custom_id":"ferry-9","response":null,"error":{"code":"batch_expired","message":"late"}}"#;
        assert!(matches!(parse_line(exp).unwrap().1, Outcome::Expired(_)));
        let can = br#"{"custom_id":"ferry-9","response":null,"error":{"code":"batch_cancelled","message":"c"}}"#;
        assert!(matches!(parse_line(can).unwrap().1, Outcome::Cancelled(_)));
        let other = br#"{"custom_id":"ferry-9","response":null,"error":{"code":"server_error","message":"boom"}}"#;
        assert!(matches!(
            parse_line(other).unwrap().1,
            Outcome::Failed(RequestError { .. })
        ));
    }

    #[test]
    fn bad_lines_are_reported_not_fatal() {
        assert!(matches!(
            parse_line(b"{nope"),
            Err(LineError::InvalidJson(_))
        ));
        assert_eq!(
            parse_line(br#"{"response":null}"#).unwrap_err(),
            LineError::MissingCustomId
        );
        assert_eq!(
            parse_line(br#"{"custom_id":"r-2","response":null,"error":null}"#).unwrap_err(),
            LineError::ForeignCustomId("r-2".into())
        );
        assert_eq!(
            parse_line(br#"{"custom_id":"ferry-2"}"#).unwrap_err(),
            LineError::Empty
        );
    }

    #[test]
    fn a_malformed_file_loses_none_of_its_good_lines() {
        let members: HashSet<u64> = [1, 2, 3, 4].into();
        let file = concat!(
            r#"{"custom_id":"ferry-2","response":{"status_code":200,"body":{"n":2}},"error":null}"#,
            "\n",
            "{this is not json\n",
            r#"{"custom_id":"someone-else","response":{"status_code":200,"body":{}}}"#,
            "\n",
            r#"{"custom_id":"ferry-99","response":{"status_code":200,"body":{}}}"#,
            "\n",
            "\n",
            r#"{"custom_id":"ferry-1","response":{"status_code":400,"body":{"error":{}}},"error":null}"#,
            "\n",
            r#"{"custom_id":"ferry-4","response":{"status_code":200,"body":{"n":4}}}"#,
        );
        // Cut the file into awkward chunks.
        let bytes = Bytes::from(file);
        let mut seen = Vec::new();
        let mut out = |id, o: Outcome| seen.push((id, matches!(o, Outcome::Completed(_))));
        let mut reader = ResultReader::new(&members);
        for start in (0..bytes.len()).step_by(7) {
            reader.push(&bytes.slice(start..(start + 7).min(bytes.len())), &mut out);
        }
        let bad = reader.finish(&mut out);
        seen.sort();
        // 1, 2 and 4 answered; 3 has no line (the caller retries it).
        assert_eq!(seen, vec![(1, true), (2, true), (4, true)]);
        assert_eq!(bad, 3);
    }

    #[test]
    fn splitter_handles_chunk_boundaries() {
        let mut s = LineSplitter::default();
        assert!(s.push(&Bytes::from_static(b"{\"a\"")).is_empty());
        let l = s.push(&Bytes::from_static(b":1}\n\n{\"b\":2}\n{\"c\""));
        assert_eq!(
            l,
            vec![
                Bytes::from_static(b"{\"a\":1}"),
                Bytes::from_static(b"{\"b\":2}")
            ]
        );
        assert_eq!(s.finish(), Some(Bytes::from_static(b"{\"c\"")));
    }
}
