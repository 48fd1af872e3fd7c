//! One client connection: read frames, answer requests, write replies.
//!
//! A connection lives on one shard. Its read buffer holds at most one frame of
//! [`MAX_FRAME_BYTES`] plus one read; an error in a frame is answered with an error frame and the
//! connection goes on, unless the stream is out of step (bad magic or length), when the error is
//! sent and the connection closed. Other connections are never affected.

use crate::shard::{MeshMsg, ShardCtx};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::UnixStream;
use kvloft_engine::protocol::{
    self, ErrorCode, ErrorReply, Frame, FrameError, FrameKind, HelloReply, Reply, Request, StatsReply, LEN_BYTES,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// How long a `stats` request waits for another shard's figures.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `stream` on the current shard until the client hangs up.
pub(crate) fn spawn(ctx: Rc<ShardCtx>, stream: UnixStream) {
    glommio::spawn_local(async move {
        ctx.metrics.connections.inc();
        let _ = Connection { ctx: ctx.clone(), greeted: false, out: Vec::new() }.serve(stream).await;
        ctx.metrics.connections.dec();
    })
    .detach();
}

struct Connection {
    ctx: Rc<ShardCtx>,
    greeted: bool,
    out: Vec<u8>,
}

/// An error to send back: code and text.
struct Failure(ErrorCode, String);

impl Connection {
    async fn serve(&mut self, mut stream: UnixStream) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let mut start = 0;
            let mut close = false;
            while start < buf.len() {
                match protocol::decode(&buf[start..]) {
                    Ok(None) => break,
                    Ok(Some((frame, used))) => {
                        start += used;
                        self.answer(&frame).await;
                    }
                    Err(e) if e.is_fatal() => {
                        self.error(0, ErrorCode::BadFrame, format!("{e} (closing the connection)"));
                        close = true;
                        break;
                    }
                    Err(e) => {
                        // The frame is whole (decode checked) and its length is trustworthy: skip it.
                        let len = protocol::frame_len(&buf[start..]).ok().flatten().unwrap_or(0);
                        start += LEN_BYTES + len;
                        let code = match e {
                            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                            _ => ErrorCode::BadFrame,
                        };
                        self.error(e.request_id(), code, e.to_string());
                    }
                }
            }
            buf.drain(..start);
            if !self.out.is_empty() {
                stream.write_all(&self.out).await?;
                self.out.clear();
            }
            if close {
                return stream.close().await;
            }
            debug_assert!(buf.len() <= LEN_BYTES + MAX_FRAME_BYTES);
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn answer(&mut self, frame: &Frame) {
        self.ctx.metrics.requests.inc();
        let id = frame.request_id;
        match self.reply(frame).await {
            Ok(reply) => protocol::encode(&mut self.out, FrameKind::Reply, id, &protocol::to_body(&reply)),
            Err(Failure(code, message)) => self.error(id, code, message),
        }
    }

    async fn reply(&mut self, frame: &Frame) -> Result<Reply, Failure> {
        if frame.kind != FrameKind::Request {
            return Err(Failure(
                ErrorCode::BadFrame,
                format!("a client may send only request frames (kind 1), not kind {}", frame.kind as u8),
            ));
        }
        let request = parse_request(&frame.body)?;
        if self.ctx.stopping.get() {
            return Err(Failure(ErrorCode::ShuttingDown, "the server is shutting down; reconnect later".into()));
        }
        match request {
            Request::Hello(hello) => {
                if hello.protocol != u32::from(PROTOCOL_VERSION) {
                    return Err(Failure(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "client speaks protocol {} but this server speaks {PROTOCOL_VERSION}; install matching kvloft versions",
                            hello.protocol
                        ),
                    ));
                }
                self.greeted = true;
                Ok(Reply::Hello(HelloReply {
                    protocol: u32::from(PROTOCOL_VERSION),
                    server_version: env!("CARGO_PKG_VERSION").into(),
                    shards: self.ctx.shared.topology.shards.len() as u32,
                    pid: std::process::id(),
                }))
            }
            other if !self.greeted => Err(Failure(
                ErrorCode::HelloRequired,
                format!("`{}` was sent before `hello`; send hello first on every connection", other.op()),
            )),
            Request::Stats(_) => self.stats().await.map(Reply::Stats),
            other => Err(Failure(ErrorCode::UnknownOp, format!("`{}` is not served by this server", other.op()))),
        }
    }

    async fn stats(&self) -> Result<StatsReply, Failure> {
        let ctx = &self.ctx;
        let n = ctx.shared.topology.shards.len();
        let mut pending = Vec::with_capacity(n);
        for peer in (0..n).filter(|&p| p != ctx.id) {
            let (tx, rx) = flume::bounded(1);
            if ctx.mesh.send_to(peer, MeshMsg::Stats { reply: tx }).await.is_err() {
                return Err(Failure(ErrorCode::Internal, format!("shard {peer} has stopped")));
            }
            pending.push((peer, rx));
        }
        let mut shards = vec![ctx.stats()];
        for (peer, rx) in pending {
            match glommio::timer::timeout(SHARD_REPLY_TIMEOUT, async { Ok(rx.recv_async().await.ok()) }).await {
                Ok(Some(s)) => shards.push(s),
                _ => {
                    return Err(Failure(
                        ErrorCode::Internal,
                        format!("shard {peer} did not answer within {SHARD_REPLY_TIMEOUT:?}"),
                    ))
                }
            }
        }
        shards.sort_by_key(|s| s.id);
        let topology = &ctx.shared.topology;
        Ok(StatsReply {
            server_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: ctx.shared.started.elapsed().as_secs_f64(),
            socket: topology.server.socket.display().to_string(),
            pool_bytes: topology.pool_bytes(),
            shards,
        })
    }

    fn error(&mut self, request_id: u64, code: ErrorCode, message: String) {
        self.ctx.metrics.errors.inc();
        let body = protocol::to_body(&ErrorReply { code, message });
        protocol::encode(&mut self.out, FrameKind::Error, request_id, &body);
    }
}

/// Decodes a request body, telling an unknown operation from a malformed known one.
fn parse_request(body: &[u8]) -> Result<Request, Failure> {
    protocol::from_body::<Request>(body).map_err(|e| {
        #[derive(Deserialize)]
        struct OpOnly {
            op: String,
        }
        match protocol::from_body::<OpOnly>(body) {
            Ok(OpOnly { op }) if !["hello", "stats"].contains(&op.as_str()) => {
                Failure(ErrorCode::UnknownOp, format!("unknown operation {op:?}; this server knows hello, stats"))
            }
            Ok(OpOnly { op }) => Failure(ErrorCode::BadRequest, format!("malformed `{op}` request: {e}")),
            Err(_) => {
                Failure(ErrorCode::BadRequest, format!("the body is not a MessagePack map with an \"op\" key: {e}"))
            }
        }
    })
}
