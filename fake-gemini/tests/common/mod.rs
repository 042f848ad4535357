//! What the integration tests share: fake-gemini as a child process, and plain HTTP/1.1 calls.

// Each test crate uses some of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

pub const KEYS: [&str; 2] = ["key-zero-0123456789", "key-one-9876543210"];
pub const GEMINI: &str = "/v1beta/models/gemini-3-pro-image-preview:generateContent";
pub const VERTEX: &str =
    "/v1/projects/my-project/locations/global/publishers/google/models/gemini-3-pro-image-preview:generateContent";

pub struct Fake {
    pub child: Child,
    pub addr: String,
}

impl Fake {
    pub fn start(args: &[&str]) -> Fake {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-gemini"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fake-gemini starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("a first line");
        let addr = line.trim().strip_prefix("fake-gemini listening on ").expect("the listening line").to_string();
        Fake { child, addr }
    }

    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        try_call(&self.addr, method, path, headers, body).expect("an answer")
    }

    pub fn json(&self, method: &str, path: &str, body: Value) -> Value {
        let a = self.call(method, path, &[("content-type", "application/json")], body.to_string().as_bytes());
        assert!(a.status < 300, "{method} {path}: {} {}", a.status, a.text());
        a.json()
    }

    pub fn get(&self, path: &str) -> Value {
        self.call("GET", path, &[], b"").json()
    }

    pub fn generate(&self, path: &str, auth: &[(&str, &str)], prompt: &str) -> Answer {
        let body = json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                          "generationConfig": {"imageConfig": {"aspectRatio": "16:9"}}});
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(auth);
        self.call("POST", path, &headers, body.to_string().as_bytes())
    }

    pub fn token(&self) -> (String, u64) {
        let a = self.call("GET", "/computeMetadata/v1/instance/service-accounts/default/token", &FLAVOR, b"");
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.header("metadata-flavor"), Some("Google"));
        let v = a.json();
        assert_eq!(v["token_type"], "Bearer");
        (v["access_token"].as_str().unwrap_or_default().to_string(), v["expires_in"].as_u64().unwrap_or(0))
    }

    /// Everything the process printed, once stopped.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const FLAVOR: [(&str, &str); 1] = [("Metadata-Flavor", "Google")];

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// `error.status` and the first ErrorInfo reason of a Google error.
    pub fn google(&self) -> (u16, String, String) {
        let v = self.json();
        let reason = v["error"]["details"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
            .map(|d| d["reason"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        (self.status, v["error"]["status"].as_str().unwrap_or_default().to_string(), reason)
    }
}

/// One HTTP/1.1 request on its own connection; `Err` when the connection is dropped before a
/// whole answer.
pub fn try_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer { status, headers, body: raw[split + 4..].to_vec() })
}
