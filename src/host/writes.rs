//! Cache writes handed from HTTP contexts to the root context, which sends them on its next
//! tick: a call-out made from a stream dies with the stream, one from the root does not.
//! One queue per VM (per worker thread), bounded.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use crate::exchange::HttpCall;

/// Writes waiting beyond this are dropped (and counted as L2 errors by the caller).
const MAX_QUEUED: usize = 256;

pub struct Write {
    pub call: HttpCall,
    pub entry: Rc<Vec<u8>>,
}

thread_local! {
    static QUEUE: RefCell<VecDeque<Write>> = const { RefCell::new(VecDeque::new()) };
}

/// Queues a write; false when the queue is full.
pub fn push(write: Write) -> bool {
    QUEUE.with(|q| {
        let mut q = q.borrow_mut();
        if q.len() >= MAX_QUEUED {
            return false;
        }
        q.push_back(write);
        true
    })
}

pub fn drain() -> Vec<Write> {
    QUEUE.with(|q| q.borrow_mut().drain(..).collect())
}
