//! Malformed frames get an error naming the problem; the server keeps serving everyone else.

use kvloft_engine::protocol::{self, ErrorCode, ErrorReply, FrameKind, Hello, Request, StatsRequest};
use kvloft_tests::TestServer;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A raw connection that keeps bytes of frames read ahead.
struct Raw {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Write for Raw {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.stream.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

fn raw(server: &TestServer) -> Raw {
    let stream = UnixStream::connect(&server.socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    Raw { stream, buf: Vec::new() }
}

fn send(s: &mut Raw, id: u64, req: &Request) {
    let mut out = Vec::new();
    protocol::encode(&mut out, FrameKind::Request, id, &protocol::to_body(req));
    s.write_all(&out).unwrap();
}

/// The next frame, or `None` once the server closed the connection.
fn read_frame(s: &mut Raw) -> Option<protocol::Frame> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((f, used)) = protocol::decode(&s.buf).unwrap() {
            s.buf.drain(..used);
            return Some(f);
        }
        let n = s.stream.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            return None;
        }
        s.buf.extend_from_slice(&chunk[..n]);
    }
}

fn error_of(f: &protocol::Frame) -> ErrorReply {
    assert_eq!(f.kind, FrameKind::Error);
    protocol::from_body(&f.body).unwrap()
}

fn hello() -> Request {
    Request::Hello(Hello { protocol: 1, client: "t".into(), pid: 1 })
}

#[test]
fn request_before_hello_is_refused_then_hello_works() {
    let server = TestServer::start(&[]);
    let mut s = raw(&server);
    send(&mut s, 7, &Request::Stats(StatsRequest {}));
    let e = error_of(&read_frame(&mut s).unwrap());
    assert_eq!(e.code, ErrorCode::HelloRequired);
    send(&mut s, 8, &hello());
    assert_eq!(read_frame(&mut s).unwrap().kind, FrameKind::Reply);
    send(&mut s, 9, &Request::Stats(StatsRequest {}));
    let f = read_frame(&mut s).unwrap();
    assert_eq!((f.kind, f.request_id), (FrameKind::Reply, 9));
}

#[test]
fn garbage_closes_only_that_connection() {
    let server = TestServer::start(&[]);
    let mut other = server.client().unwrap();
    let mut s = raw(&server);
    s.write_all(b"\x10\x00\x00\x00GET / HTTP/1.1\r\n\r\n").unwrap();
    let e = error_of(&read_frame(&mut s).unwrap());
    assert_eq!(e.code, ErrorCode::BadFrame);
    assert!(e.message.contains("magic"), "{}", e.message);
    assert!(read_frame(&mut s).is_none(), "connection closed");
    assert!(other.stats().is_ok(), "other clients keep working");
}

#[test]
fn oversized_frame_is_refused() {
    let server = TestServer::start(&[]);
    let mut s = raw(&server);
    s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
    let e = error_of(&read_frame(&mut s).unwrap());
    assert!(e.message.contains("exceeds the limit"), "{}", e.message);
    assert!(server.client().unwrap().stats().is_ok());
}

#[test]
fn unknown_op_bad_body_and_version_keep_the_connection() {
    let server = TestServer::start(&[]);
    let mut s = raw(&server);
    send(&mut s, 1, &hello());
    read_frame(&mut s).unwrap();

    let mut out = Vec::new();
    protocol::encode(&mut out, FrameKind::Request, 2, b"\x81\xa2op\xa3fly");
    protocol::encode(&mut out, FrameKind::Request, 3, b"\xc1garbage");
    let mut v2 = Vec::new();
    protocol::encode(&mut v2, FrameKind::Request, 4, b"\x80");
    v2[6] = 9; // header version 9
    out.extend_from_slice(&v2);
    s.write_all(&out).unwrap();
    let codes: Vec<(u64, ErrorCode)> = (0..3)
        .map(|_| {
            let f = read_frame(&mut s).unwrap();
            (f.request_id, error_of(&f).code)
        })
        .collect();
    assert_eq!(codes, vec![(2, ErrorCode::UnknownOp), (3, ErrorCode::BadRequest), (4, ErrorCode::UnsupportedVersion)]);
    send(&mut s, 5, &Request::Stats(StatsRequest {}));
    assert_eq!(read_frame(&mut s).unwrap().kind, FrameKind::Reply);
}

#[test]
fn hello_with_another_protocol_version_is_refused() {
    let server = TestServer::start(&[]);
    let mut s = raw(&server);
    send(&mut s, 1, &Request::Hello(Hello { protocol: 2, client: "future".into(), pid: 1 }));
    let e = error_of(&read_frame(&mut s).unwrap());
    assert_eq!(e.code, ErrorCode::UnsupportedVersion);
    assert!(e.message.contains("protocol 2") && e.message.contains("speaks 1"), "{}", e.message);
}
