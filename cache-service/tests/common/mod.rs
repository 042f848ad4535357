//! What the integration tests share: the service as a child process, a raw HTTP/1.1 client
//! (raw, so a test can also misbehave as a client), and fake and real Redis servers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cache-service");

/// A running cache-service, killed on drop.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("IMAGE_CACHE_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cache-service starts");
    let (tx, rx) = mpsc::channel();
    for out in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
    {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// Starts cache-service on a free port and waits for its ready line.
pub fn start(args: &[&str]) -> Service {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let (mut child, lines) = spawn(&all);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("cache-service ready on ") {
                    let addr = rest.split(": store").next().unwrap().parse().unwrap();
                    return Service { child, addr };
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    panic!("cache-service {args:?} did not get ready: {seen:?}");
}

/// Runs cache-service expecting it to exit within `within`: its status (None if it did not
/// exit in time, and it is killed), how long it took, and what it printed.
pub fn run_until_exit(args: &[&str], within: Duration) -> (Option<ExitStatus>, Duration, String) {
    let (mut child, lines) = spawn(args);
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    thread::sleep(Duration::from_millis(50));
    (status, took, lines.try_iter().collect::<Vec<_>>().join("\n"))
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request on its own connection (`connection: close`); reads the whole answer.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: cache\r\nconnection: close\r\n");
    if !body.is_empty() || method == "PUT" {
        head += &format!("content-length: {}\r\n", body.len());
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let raw = read_all(&mut s).unwrap_or_else(|e| panic!("{method} {path}: no whole answer: {e}"));
    parse(&raw).unwrap_or_else(|| panic!("{method} {path}: not HTTP: {:?}", String::from_utf8_lossy(&raw)))
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

pub fn put(addr: SocketAddr, key: &str, value: &[u8], ttl: u64) -> u16 {
    request(addr, "PUT", &format!("/v1/cache/{key}"), &[("x-cache-ttl-seconds", &ttl.to_string())], value).status
}

pub fn stats(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr, "/v1/stats");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).unwrap()
}

/// Reads until the peer closes (a reset after the answer counts as a close).
pub fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

fn parse(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Response { status, body: raw[end + 4..].to_vec() })
}

/// Waits until `f` holds, for at most `within`.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Reads one RESP command (an array of bulk strings).
fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0u8; len + 2];
        r.read_exact(&mut buf).ok()?;
        args.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    Some(args)
}

/// A "Redis" that accepts connections and then never answers. With `greets`, it answers the
/// connection setup (`CLIENT ...`, `HELLO`, `SELECT`, `AUTH`) and `PING` first, so the
/// service starts, and hangs on every other command.
pub fn hung_redis(greets: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                while let Some(cmd) = read_command(&mut r) {
                    let name = cmd.first().map(|c| c.to_ascii_uppercase()).unwrap_or_default();
                    let reply: &[u8] = match name.as_str() {
                        "CLIENT" | "HELLO" | "SELECT" | "AUTH" if greets => b"+OK\r\n",
                        "PING" if greets => b"+PONG\r\n",
                        _ => continue,
                    };
                    if w.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A real redis-server on a free port, stopped on drop; None (after saying why) when
/// redis-server is not installed.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let binary = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .map(String::from)
            .or_else(|| {
                let out = Command::new("sh").args(["-c", "command -v redis-server"]).output().ok()?;
                let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
                (!path.is_empty()).then_some(path)
            });
        let Some(binary) = binary else {
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer { child, port };
        let up = eventually(Duration::from_secs(10), || server.command(&["PING"]).is_some_and(|r| r == "PONG"));
        assert!(up, "redis-server answers PING");
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one command; the answer of a status, integer or bulk reply, as text.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        (&s).write_all(req.as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        match line.as_bytes().first()? {
            b'+' | b':' => Some(line[1..].to_string()),
            b'$' => {
                let len: usize = line[1..].parse().ok()?;
                let mut buf = vec![0u8; len + 2];
                r.read_exact(&mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..len]).into_owned())
            }
            _ => None,
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: a real hung Redis.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}

/// A TCP proxy whose connections can be silenced: after `silence()`, every connection opened so
/// far stops forwarding either way without being closed, as when a peer vanishes without a
/// reset (a failover, a partition). Later connections forward normally.
pub struct Proxy {
    pub addr: SocketAddr,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    silenced_below: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let silenced_below = Arc::new(AtomicUsize::new(0));
        let (o, sb) = (opened.clone(), silenced_below.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(upstream)) else { continue };
                let id = o.fetch_add(1, Ordering::SeqCst);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let sb = sb.clone();
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if id >= sb.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy { addr, opened, silenced_below }
    }

    pub fn silence(&self) {
        use std::sync::atomic::Ordering;
        self.silenced_below.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}
