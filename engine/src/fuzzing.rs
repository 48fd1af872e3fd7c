//! Fuzz bodies: one function per fuzz target, shared by the cargo-fuzz targets in `fuzz/` and by
//! their deterministic smoke tests (`engine/tests/frame_fuzz_smoke.rs`), which run on stable in CI.
//!
//! A body takes the fuzzer's bytes, drives the code under test the way the server does, and
//! panics when an invariant breaks. It never panics for bytes a peer may legitimately send, bad or
//! not: those are answered with an error frame, never a crash.

use crate::protocol::{
    self, BodyError, ErrorReply, Event, Frame, FrameError, FrameKind, Reply, Request, HEADER_BYTES, LEN_BYTES, MAGIC,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use serde::Deserialize;

/// Bytes at the start of the input at whose every position the stream is also split in two, to
/// check that frames arriving in pieces decode the same as in one read.
const SPLIT_PREFIX: usize = 64;

/// What the connection's read loop did at one point of the stream. Offsets are from the start of
/// the stream, so runs fed in different pieces compare equal only if they saw the same frames.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A frame decoded at `at`, `used` bytes long.
    Frame { at: usize, used: usize, kind: FrameKind, request_id: u64 },
    /// A whole frame at `at` with a non-fatal error, skipped.
    Skipped { at: usize, error: FrameError },
    /// A fatal error at `at`; the connection closed.
    Closed { at: usize, error: FrameError },
}

/// Everything one run of the read loop did.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    steps: Vec<Step>,
    /// Bytes left waiting for the rest of a frame at the end, or `None` once closed.
    pending: Option<usize>,
    /// Stream offset of the first byte not consumed (of the frame waited on, or that closed).
    offset: usize,
}

impl Step {
    fn at(&self) -> usize {
        match *self {
            Step::Frame { at, .. } | Step::Skipped { at, .. } | Step::Closed { at, .. } => at,
        }
    }
}

/// Fuzz target `frame_decoder`: `data` is what a client wrote on its socket.
///
/// Runs it through the server's read loop (decode from an offset; on a frame, answer its body; on
/// a non-fatal error skip [`LEN_BYTES`] + [`protocol::frame_len`] bytes; stop on a fatal error or
/// an incomplete frame) and decodes each body as its receiver would ([`Request::decode`] and the
/// tagged [`Request`] for requests, [`Reply`], [`Event`] and [`ErrorReply`] for the others).
/// Asserts that:
///
/// - nothing panics and `used` never exceeds the bytes given to `decode`;
/// - a decoded frame re-encodes with [`protocol::encode`] to exactly the bytes it used;
/// - [`protocol::frame_len`] agrees with `decode` (same length, same fatal error, incomplete when
///   `decode` says so);
/// - only `TooLarge`, `TooShort` and `BadMagic` are fatal, each with the fields the bytes carry;
/// - a body that decodes re-encodes to one that decodes to the same message;
/// - the same steps come out when the bytes arrive in pieces: split in two at any of the first
///   64 positions, or one byte at a time over those.
///
/// A run fed in pieces is checked up to the moment its last piece arrives: its steps so far must
/// lead those of the run that got everything at once, and it must wait at the offset where that
/// run went on. From there both loops see the same bytes from the same offset, and decoding is a
/// function of those alone, so the rest is the same without running it again (once, for the
/// cut at the end of the prefix, it is run to the end and compared whole all the same). That keeps
/// the cost of the pieces to the prefix, whatever the length of the input.
pub fn frame_decoder(data: &[u8]) {
    let whole = read_loop(&[data], true);
    let prefix = data.len().min(SPLIT_PREFIX);
    for cut in 0..prefix {
        let early = read_loop(&[&data[..cut]], false);
        leads(&early, &whole, || format!("the first {cut} bytes alone"));
    }
    let pieces: Vec<&[u8]> = data[..prefix].chunks(1).collect();
    let trickle = read_loop(&pieces, false);
    leads(&trickle, &whole, || format!("the first {prefix} bytes one at a time"));
    let split = read_loop(&[&data[..prefix], &data[prefix..]], false);
    assert_eq!(split, whole, "a split at byte {prefix} changed what was decoded");
}

/// `early`, a run over the first bytes of a stream, did what `whole`, the run over all of it, did
/// up to there: the same steps, then either closed as `whole` did or waits where `whole` went on.
fn leads(early: &Outcome, whole: &Outcome, what: impl Fn() -> String) {
    let n = early.steps.len();
    assert!(
        whole.steps.len() >= n && whole.steps[..n] == early.steps[..],
        "{} decoded {:?}, all at once {:?}",
        what(),
        early.steps,
        whole.steps
    );
    if early.pending.is_none() {
        assert!(whole.pending.is_none() && whole.steps.len() == n, "{} closed, all at once did not", what());
    } else {
        let next = whole.steps.get(n).map_or(whole.offset, Step::at);
        assert_eq!(early.offset, next, "{} waits at another offset than where all at once went on", what());
    }
}

/// The server connection's read loop (`kvloft-shard`'s `Connection::read_loop`), over `chunks`
/// arriving one read at a time, checking every decoder answer against the bytes.
fn read_loop(chunks: &[&[u8]], check_bodies: bool) -> Outcome {
    let mut buf: Vec<u8> = Vec::new();
    let mut base = 0; // stream offset of buf[0]
    let mut steps = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut start = 0;
        while start < buf.len() {
            let rest = &buf[start..];
            let at = base + start;
            let len = protocol::frame_len(rest);
            match protocol::decode(rest) {
                Ok(None) => {
                    match len {
                        Ok(None) => assert!(rest.len() < LEN_BYTES + MAGIC.len(), "frame_len waits on a whole prefix"),
                        Ok(Some(len)) => assert!(LEN_BYTES + len > rest.len(), "decode waits on a whole frame"),
                        Err(e) => panic!("frame_len failed with {e:?} where decode waits"),
                    }
                    break;
                }
                Ok(Some((frame, used))) => {
                    assert!(used <= rest.len(), "used {used} of {} bytes", rest.len());
                    assert_eq!(len, Ok(Some(used - LEN_BYTES)), "frame_len disagrees with decode");
                    let mut again = Vec::with_capacity(used);
                    protocol::encode(&mut again, frame.kind, frame.request_id, &frame.body);
                    assert!(again == rest[..used], "frame does not re-encode to the bytes it came from");
                    if check_bodies {
                        check_body(&frame);
                    }
                    steps.push(Step::Frame { at, used, kind: frame.kind, request_id: frame.request_id });
                    start += used;
                }
                Err(error) if error.is_fatal() => {
                    check_fatal(&error, rest);
                    assert_eq!(len, Err(error.clone()), "frame_len disagrees with decode on a fatal error");
                    let _ = error.to_string();
                    steps.push(Step::Closed { at, error });
                    return Outcome { steps, pending: None, offset: at };
                }
                Err(error) => {
                    // The server skips LEN_BYTES + frame_len; that must be the whole frame, here.
                    let Ok(Some(len)) = len else { panic!("frame_len gave {len:?} for a skippable {error:?}") };
                    assert!(LEN_BYTES + len <= rest.len(), "skipping a frame that is not all here");
                    check_skipped(&error, rest);
                    let _ = error.to_string();
                    steps.push(Step::Skipped { at, error });
                    start += LEN_BYTES + len;
                }
            }
        }
        buf.drain(..start);
        base += start;
        assert!(buf.len() <= LEN_BYTES + MAX_FRAME_BYTES, "{} bytes pending", buf.len());
    }
    Outcome { steps, pending: Some(buf.len()), offset: base }
}

/// A fatal error is one of the three that leave the stream out of step, with the bytes' values.
fn check_fatal(error: &FrameError, rest: &[u8]) {
    let prefix = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    match *error {
        FrameError::TooLarge { len, max } => {
            assert_eq!((len, max), (prefix, MAX_FRAME_BYTES));
            assert!(len > MAX_FRAME_BYTES);
        }
        FrameError::TooShort { len } => {
            assert_eq!(len, prefix);
            assert!(len < HEADER_BYTES);
        }
        FrameError::BadMagic { found } => {
            assert!((HEADER_BYTES..=MAX_FRAME_BYTES).contains(&prefix));
            assert_eq!(found, [rest[LEN_BYTES], rest[LEN_BYTES + 1]]);
            assert_ne!(found, MAGIC);
        }
        FrameError::UnsupportedVersion { .. } | FrameError::UnknownKind { .. } => {
            panic!("{error:?} is not one of the fatal errors")
        }
    }
    assert_eq!(error.request_id(), 0);
}

/// A skipped frame has good magic and a bad version or kind, and names the frame's request id.
fn check_skipped(error: &FrameError, rest: &[u8]) {
    let h = &rest[LEN_BYTES..LEN_BYTES + HEADER_BYTES];
    assert_eq!(h[..2], MAGIC);
    let id = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    match *error {
        FrameError::UnsupportedVersion { found, request_id } => {
            assert_eq!((found, request_id), (h[2], id));
            assert_ne!(found, PROTOCOL_VERSION);
        }
        FrameError::UnknownKind { found, request_id } => {
            assert_eq!((found, request_id), (h[3], id));
            assert_eq!(h[2], PROTOCOL_VERSION);
            assert!(!(1..=4).contains(&found));
        }
        FrameError::TooLarge { .. } | FrameError::TooShort { .. } | FrameError::BadMagic { .. } => {
            panic!("{error:?} is fatal but was not reported so")
        }
    }
    assert_eq!(error.request_id(), id);
}

/// Decodes a frame's body as its receiver does: requests as the server, the rest as a client.
fn check_body(frame: &Frame) {
    let body = &frame.body[..];
    match frame.kind {
        FrameKind::Request => check_request(body),
        FrameKind::Reply => {
            if let Ok(reply) = protocol::from_body::<Reply>(body) {
                // `uptime_s` may be NaN, so compare the bytes of a second encoding, not values.
                let bytes = protocol::to_body(&reply);
                let again: Reply = protocol::from_body(&bytes).expect("an encoded reply decodes");
                assert!(protocol::to_body(&again) == bytes, "{reply:?} does not survive a round trip");
            }
        }
        FrameKind::Event => {
            if let Ok(event) = protocol::from_body::<Event>(body) {
                round_trip(&event);
            }
        }
        FrameKind::Error => {
            if let Ok(error) = protocol::from_body::<ErrorReply>(body) {
                round_trip(&error);
            }
        }
    }
}

/// The server's request decoding ([`Request::decode`]), the generic tagged path, and the `"op"`
/// probe the server uses to tell an unknown operation from a malformed one: they must agree.
fn check_request(body: &[u8]) {
    #[derive(Deserialize)]
    struct OpOnly {
        op: String,
    }
    let op = protocol::from_body::<OpOnly>(body).map(|o| o.op);
    let tagged = protocol::from_body::<Request>(body);
    let decoded = Request::decode(body);
    // The in-place reader of packed lookups is a shortcut: whatever it accepts, the general
    // decoder reads as the same packed lookup.
    if let Some(view) = protocol::PackedLookupView::parse(body) {
        match &decoded {
            Ok(Request::Lookup(l)) => {
                let packed = l.packed.as_ref().expect("a packed lookup");
                assert!(l.hashes.is_empty(), "the view took a lookup with listed hashes");
                assert_eq!((u64::from(packed.hash_bytes), packed.bytes.as_slice()), (view.hash_bytes, view.bytes));
            }
            // hash_bytes beyond u32: the general decoder refuses what the view's checks refuse too.
            Err(BodyError::Malformed { op: "lookup", .. }) => assert!(view.hashes().is_err()),
            other => panic!("the view read a packed lookup the decoder read as {other:?}"),
        }
    }
    match &decoded {
        Ok(request) => {
            assert_eq!(op.as_deref().ok(), Some(request.op()), "decode read another op than the probe");
            round_trip(request);
            assert_eq!(Request::decode(&protocol::to_body(request)).as_ref(), Ok(request));
            if let Ok(tagged) = &tagged {
                assert_eq!(tagged, request, "decode and the tagged enum read the same body differently");
            }
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                BodyError::NoOp(_) => assert!(op.is_err(), "NoOp, but the probe read op {op:?}"),
                BodyError::UnknownOp(name) => {
                    assert_eq!(op.as_ref().ok(), Some(name));
                    assert!(!Request::OPS.contains(&name.as_str()));
                }
                BodyError::Malformed { op: name, .. } => {
                    assert_eq!(op.as_deref().ok(), Some(*name));
                    assert!(Request::OPS.contains(name));
                }
            }
        }
    }
    if let Ok(request) = &tagged {
        round_trip(request);
        assert!(Request::OPS.contains(&request.op()));
    }
}

/// A decoded message encodes to a body that decodes to the same message.
fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = protocol::to_body(value);
    let again: T = protocol::from_body(&bytes).expect("an encoded message decodes");
    assert_eq!(&again, value, "message does not survive a round trip");
}
