//! A blocking client of protocol v1, for the CLI, tests and benchmarks.

use kvloft_engine::protocol::{
    self, ErrorCode, ErrorReply, FrameError, FrameKind, Hello, HelloReply, Reply, Request, StatsReply, StatsRequest,
    PROTOCOL_VERSION,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No server listens on the path: start one with `kvloft serve`, or pass its socket path.
    #[error("no kvloft server at {path}: {cause}; start one with `kvloft serve` or pass --socket")]
    Unavailable {
        /// The path tried.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The connection broke or timed out mid-call; reconnect.
    #[error("connection to the kvloft server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("the server sent an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// The server's body did not decode; client and server versions differ.
    #[error("cannot decode the server's reply: {0}; check that client and server versions match")]
    Decode(String),
    /// The server answered with an error frame.
    #[error("server error {code:?}: {message}")]
    Server {
        /// Machine-readable cause.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server answered with a reply of another operation.
    #[error("unexpected reply to `{0}`")]
    UnexpectedReply(&'static str),
}

/// A connected, greeted client.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
    buf: Vec<u8>,
    /// What the server said in `hello`.
    pub server: HelloReply,
}

impl Client {
    /// Connects to `path` and says hello. `timeout` bounds every read and write.
    pub fn connect(path: &Path, client_name: &str, timeout: Duration) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|cause| ClientError::Unavailable { path: path.into(), cause })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = Self {
            stream,
            next_id: 1,
            buf: Vec::new(),
            server: HelloReply { protocol: 0, server_version: String::new(), shards: 0, pid: 0 },
        };
        let hello =
            Hello { protocol: u32::from(PROTOCOL_VERSION), client: client_name.into(), pid: std::process::id() };
        match client.call(&Request::Hello(hello))? {
            Reply::Hello(h) => client.server = h,
            _ => return Err(ClientError::UnexpectedReply("hello")),
        }
        Ok(client)
    }

    /// Server figures.
    pub fn stats(&mut self) -> Result<StatsReply, ClientError> {
        match self.call(&Request::Stats(StatsRequest {}))? {
            Reply::Stats(s) => Ok(s),
            _ => Err(ClientError::UnexpectedReply("stats")),
        }
    }

    /// Sends `request` and waits for its reply (events for other requests are not expected yet).
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        protocol::encode(&mut out, FrameKind::Request, id, &protocol::to_body(request));
        self.stream.write_all(&out)?;
        loop {
            let frame = self.read_frame()?;
            if frame.request_id != id {
                continue;
            }
            return match frame.kind {
                FrameKind::Reply => protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string())),
                FrameKind::Error => {
                    let e: ErrorReply =
                        protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string()))?;
                    Err(ClientError::Server { code: e.code, message: e.message })
                }
                _ => continue,
            };
        }
    }

    fn read_frame(&mut self) -> Result<protocol::Frame, ClientError> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some((frame, used)) = protocol::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection").into()
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
