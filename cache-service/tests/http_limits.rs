//! Issue 11: clients that misbehave cannot hold the service. Headers and bodies are read within
//! `--read-timeout-ms`, an answer nobody reads is dropped after `--write-timeout-ms`, and at
//! most `--max-connections` connections are served at once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{eventually, get, put, read_all, request, start, Service};

fn disk_service(extra: &[&str]) -> (Service, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--dir", dir.path().to_str().unwrap(), "--max-bytes", "268435456"];
    args.extend_from_slice(extra);
    (start(&args), dir)
}

fn connect(s: &Service) -> TcpStream {
    let c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    c
}

/// Reads until the service closes the connection: what it sent and how long that took.
/// Fails if the connection is still open after 8 s.
fn until_closed(c: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let got = read_all(c).unwrap_or_else(|e| panic!("still open after {:?}: {e}", started.elapsed()));
    (got, started.elapsed())
}

#[test]
fn headers_sent_slowly_are_cut_off() {
    let (s, _dir) = disk_service(&["--read-timeout-ms", "500"]);
    let mut c = connect(&s);
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: cache\r\n").unwrap();
    // A slowloris: one more header line every 100 ms, never the end of the headers.
    let mut trickle = c.try_clone().unwrap();
    thread::spawn(move || {
        for i in 0..100 {
            thread::sleep(Duration::from_millis(100));
            if trickle.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).is_err() {
                return;
            }
        }
    });
    let (_, took) = until_closed(&mut c);
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let (s, _dir) = disk_service(&["--read-timeout-ms", "500"]);
    let mut c = connect(&s);
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: cache\r\n\r\n").unwrap();
    let mut buf = [0u8; 1024];
    let n = c.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    let (rest, took) = until_closed(&mut c);
    assert!(rest.is_empty() || rest.ends_with(b"ok"), "{rest:?}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

#[test]
fn a_body_that_stops_is_cut_off_with_408() {
    let (s, _dir) = disk_service(&["--read-timeout-ms", "500"]);
    let mut c = connect(&s);
    c.write_all(b"PUT /v1/cache/img:slow HTTP/1.1\r\nhost: cache\r\ncontent-length: 1000\r\n\r\nonly ten b").unwrap();
    let (got, took) = until_closed(&mut c);
    assert!(got.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(get(s.addr, "/v1/cache/img:slow").status, 404, "nothing stored");
}

#[test]
fn a_body_sent_slowly_is_cut_off_at_the_timeout_not_at_its_end() {
    let (s, _dir) = disk_service(&["--read-timeout-ms", "500"]);
    let mut c = connect(&s);
    c.write_all(b"PUT /v1/cache/img:drip HTTP/1.1\r\nhost: cache\r\ncontent-length: 100\r\n\r\n").unwrap();
    let mut drip = c.try_clone().unwrap();
    thread::spawn(move || {
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(50));
            if drip.write_all(b"x").is_err() {
                return;
            }
        }
    });
    let (got, took) = until_closed(&mut c);
    assert!(got.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
}

#[test]
fn bodies_over_the_entry_bound_are_refused() {
    let (s, _dir) = disk_service(&["--max-entry-bytes", "1000"]);
    assert_eq!(put(s.addr, "img:fits", &[b'x'; 1000], 60), 204);
    assert_eq!(put(s.addr, "img:big", &[b'x'; 1001], 60), 413);
    // Chunked, so no content-length tells in advance.
    let mut c = connect(&s);
    let chunk = [b'x'; 600];
    c.write_all(
        b"PUT /v1/cache/img:chunked HTTP/1.1\r\nhost: cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    for _ in 0..2 {
        c.write_all(b"258\r\n").unwrap();
        c.write_all(&chunk).unwrap();
        c.write_all(b"\r\n").unwrap();
    }
    c.write_all(b"0\r\n\r\n").unwrap();
    let (got, _) = until_closed(&mut c);
    assert!(got.starts_with(b"HTTP/1.1 413"), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(get(s.addr, "/v1/cache/img:chunked").status, 404);
}

#[test]
fn connections_over_the_cap_get_503_at_once_and_a_freed_slot_is_reused() {
    let (s, _dir) = disk_service(&["--max-connections", "2", "--read-timeout-ms", "10000"]);
    // Two connections that hold their slots: headers begun, never finished.
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let mut third = connect(&s);
    let (got, took) = until_closed(&mut third);
    assert!(got.starts_with(b"HTTP/1.1 503"), "{:?}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    drop(held.pop());
    assert!(eventually(Duration::from_secs(3), || get(s.addr, "/healthz").status == 200), "a slot is free again");
    drop(held);
}

#[test]
fn a_client_that_stops_reading_its_answer_is_cut_off() {
    let (s, _dir) = disk_service(&["--max-connections", "1", "--write-timeout-ms", "500"]);
    let value = vec![b'v'; 16 << 20];
    assert_eq!(put(s.addr, "img:large", &value, 600), 204);
    // A client with a tiny receive buffer asks for 16 MiB and reads none of it.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    assert!(eventually(Duration::from_secs(3), || get(s.addr, "/healthz").status == 200));
    sock.connect(&s.addr.into()).unwrap();
    let mut stalled: TcpStream = sock.into();
    stalled.write_all(b"GET /v1/cache/img:large HTTP/1.1\r\nhost: cache\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(request(s.addr, "GET", "/healthz", &[], b"").status, 503, "the stalled client holds the only slot");
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(5), || get(s.addr, "/healthz").status == 200), "the slot comes back");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // The connection was dropped, not just paused: what was still queued is gone.
    stalled.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let got = read_all(&mut stalled).expect("the service closed the connection");
    assert!(got.len() < value.len(), "the whole answer came: {} bytes", got.len());
}
