//! How a large local reply reaches Envoy with one copy instead of three.
//!
//! `send_http_response` copies the body out of the VM into a string, Envoy copies that string
//! again into the local reply, and again into the buffer it encodes: on a 2.8 MB hit those
//! copies were most of what the filter cost over Envoy's own `direct_response` (which makes
//! the last two). So a reply of `CARRIED_MIN_BYTES` or more is sent with a one-byte body, and
//! its real body is put in place when the reply passes back through this filter's own
//! response callbacks (Envoy runs a local reply through every encoder filter, this one
//! included): the headers get the real `content-length`, the one-byte body is replaced by the
//! real one, a single copy straight from the VM into Envoy's buffer. Measured in
//! docs/performance.md ("Hits at Envoy's own speed").
//!
//! A filter between this one and the router sees the placeholder on its way out; one that
//! encoded it (a compressor) loses its encoding here, so the client always gets exactly the
//! bytes the filter answered. A `HEAD` reply has no body callback: its headers get the length
//! and the body is dropped. Envoy may also end a local reply at its headers for other reasons
//! (a gRPC request gets a headers-only reply): then no length is set and the body is dropped,
//! as Envoy drops the body of such a reply. When the host refuses the headers or the body, the
//! response is reset: a cut is better than a body that does not match its length.

use super::*;

/// Replies with bodies at least this large are carried; smaller ones cost less to copy than
/// the extra callbacks.
pub const CARRIED_MIN_BYTES: usize = 64 * 1024;

/// What stands in for a carried body until it is put in place.
const PLACEHOLDER: &[u8] = b" ";

/// A carried reply's body, from its local reply until its response callbacks.
#[derive(Default)]
pub(super) enum Carried {
    #[default]
    None,
    /// Sent with the placeholder; the body goes in at the first response body callback.
    Waiting(Rc<Vec<u8>>),
    /// Put in place: anything more a filter added after it is dropped.
    Placed,
}

impl StreamDriver {
    /// Sends a local reply, a large body carried to the response callbacks.
    pub(super) fn send_local_reply(&mut self, host: &mut dyn Host, reply: &Reply) -> bool {
        if reply.body.len() < CARRIED_MIN_BYTES {
            return host.send_reply(reply);
        }
        let placeholder =
            Reply { status: reply.status, headers: reply.headers.clone(), body: Rc::new(PLACEHOLDER.to_vec()) };
        if !host.send_reply(&placeholder) {
            return false;
        }
        self.carried = Carried::Waiting(reply.body.clone());
        true
    }

    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Verdict {
        let Carried::Waiting(body) = &self.carried else { return self.stream_response_headers(host, end_of_stream) };
        let head = self.fetch.as_ref().is_some_and(FileFetch::is_head);
        if end_of_stream && !head {
            // Headers only, and not for a HEAD: nothing of the body goes out, so no length.
            self.carried = Carried::None;
            return Verdict::Continue;
        }
        let length = body.len().to_string();
        // A filter after this one may have encoded the placeholder; the body that goes in
        // place of it is not encoded.
        let fixed = host.set_response_header("content-encoding", None)
            & host.set_response_header("transfer-encoding", None)
            & host.set_response_header("content-length", Some(&length));
        if !fixed {
            host.log(LogLevel::Error, "gemini-image-filter: the host refused a reply's headers; resetting");
            host.reset_response();
            self.carried = Carried::Placed;
            return Verdict::Continue;
        }
        if end_of_stream {
            // A HEAD: its length, and no body.
            self.carried = Carried::None;
        }
        Verdict::Continue
    }

    pub fn on_response_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        match std::mem::take(&mut self.carried) {
            Carried::None => self.stream_response_body(host, body_size, end_of_stream),
            Carried::Waiting(body) => {
                if !host.set_response_body(body_size, &body) {
                    // The headers promised the whole body: a cut is better than a wrong one.
                    host.log(LogLevel::Error, "gemini-image-filter: the host refused a reply's body; resetting");
                    host.reset_response();
                }
                self.carried = Carried::Placed;
                Verdict::Continue
            }
            Carried::Placed => {
                self.carried = Carried::Placed;
                if body_size > 0 {
                    host.set_response_body(body_size, &[]);
                }
                Verdict::Continue
            }
        }
    }
}
