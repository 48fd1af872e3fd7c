//! Where a GPU save or load spends its time on the server, for finding what lies outside its
//! copy (decision 58). With `KVLOFT_TRACE_GPU=1` in the server's environment, every GPU save and
//! load writes one line to stderr once its completion is written:
//!
//! ```text
//! kvloft: trace shard 3 save 64 blocks (us from the request's frame): queued 9.1 spawned 9.8 slots 14.0 pushed 120.3 seen 671.2 answered 674.9
//! ```
//!
//! `queued` is the `queued` reply written, `spawned` the copy task's start, `slots` every slot
//! known, `pushed` the copy queued, `seen` the copy seen done, `answered` the completion
//! written. Off (the default), a request pays one load of a cached flag.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The marks of one traced request.
#[derive(Debug)]
pub(crate) struct RequestTrace {
    op: &'static str,
    blocks: usize,
    start: Instant,
    marks: RefCell<Vec<(&'static str, Duration)>>,
}

/// A request's trace, when tracing is on.
pub(crate) type Trace = Option<Rc<RequestTrace>>;

/// Whether `KVLOFT_TRACE_GPU` asks for traces (set and neither empty nor `0`); read once.
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVLOFT_TRACE_GPU").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// A trace of request `op` of `blocks` blocks whose frame was read at `start`, or `None` when
/// tracing is off.
pub(crate) fn begin(op: &'static str, blocks: usize, start: Instant) -> Trace {
    enabled().then(|| Rc::new(RequestTrace { op, blocks, start, marks: RefCell::new(Vec::new()) }))
}

/// Records that the request reached `what` now.
pub(crate) fn mark(trace: &Trace, what: &'static str) {
    if let Some(t) = trace {
        t.marks.borrow_mut().push((what, t.start.elapsed()));
    }
}

/// Writes the request's line (see the module's doc) for shard `shard`.
pub(crate) fn report(trace: &Trace, shard: usize) {
    if let Some(t) = trace {
        let marks: Vec<String> =
            t.marks.borrow().iter().map(|(what, at)| format!("{what} {:.1}", at.as_secs_f64() * 1e6)).collect();
        eprintln!(
            "kvloft: trace shard {shard} {} {} blocks (us from the request's frame): {}",
            t.op,
            t.blocks,
            marks.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_in_order_and_relative_to_the_frame() {
        let t = Rc::new(RequestTrace {
            op: "save",
            blocks: 2,
            start: Instant::now() - Duration::from_millis(1),
            marks: RefCell::new(Vec::new()),
        });
        let traced: Trace = Some(t.clone());
        mark(&traced, "spawned");
        mark(&traced, "answered");
        let marks = t.marks.borrow();
        assert_eq!(marks.iter().map(|m| m.0).collect::<Vec<_>>(), ["spawned", "answered"]);
        assert!(marks[0].1 >= Duration::from_millis(1) && marks[0].1 <= marks[1].1);
        // Off unless the environment asks: nothing is recorded.
        if !enabled() {
            assert!(begin("load", 1, Instant::now()).is_none());
        }
    }
}
