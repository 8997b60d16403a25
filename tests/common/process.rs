//! A child process started on port 0 that announces its addresses, shared by
//! the integration tests (`tests/common`) and the load harness
//! (`benches/load.rs`, which includes this file by path).
#![allow(dead_code)] // each binary that includes this uses a different part

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addrs: HashMap<String, SocketAddr>,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill");
        self.child.wait().expect("wait")
    }
}

/// Starts `cmd` with stderr to `log`, waits up to `wait` until it has
/// announced every service in `services` on stdout (the
/// `{"event":"listening"}` lines), and keeps draining stdout.
pub fn spawn(mut cmd: Command, services: &[&str], log: PathBuf, wait: Duration) -> Proc {
    let logfile = std::fs::File::create(&log).expect("log file");
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(logfile))
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "listening"
            {
                let _ = tx.send((
                    v["service"].as_str().unwrap_or("").to_owned(),
                    v["addr"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
    });
    let mut addrs = HashMap::new();
    while !services.iter().all(|s| addrs.contains_key(*s)) {
        match rx.recv_timeout(wait) {
            Ok((service, addr)) => {
                addrs.insert(service, addr.parse().expect("announced address"));
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "process did not announce {services:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
    Proc { child, addrs, log }
}
