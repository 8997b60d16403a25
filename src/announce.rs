//! The one line a process prints on stdout when a listener is bound, so that
//! scripts and tests which ask for port 0 learn the port the OS chose.
//!
//! Format: `{"event":"listening","service":"<name>","addr":"127.0.0.1:PORT"}`.

use std::io::Write;
use std::net::SocketAddr;

/// Writes the listening line to stdout and flushes it at once (stdout may be a
/// pipe, which is block-buffered).
pub fn listening(service: &str, addr: SocketAddr) {
    let line =
        serde_json::json!({"event": "listening", "service": service, "addr": addr.to_string()});
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the server down.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
