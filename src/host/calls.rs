//! The few host calls the filter makes, wrapped so that nothing here can panic: every
//! failure becomes `None`/`Err` for the caller to turn into an answer. Header values are read
//! as bytes (the SDK's string readers panic on non-UTF-8 values a client can send).

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel as HostLevel, MapType, MetricType, Status};

use crate::access_log::LogLevel;

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn header(map: MapType, name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(map, name) {
        Ok(Some(v)) => Some(String::from_utf8_lossy(&v).into_owned()),
        _ => None,
    }
}

pub fn request_header(name: &str) -> Option<String> {
    header(MapType::HttpRequestHeaders, name)
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI's CSPRNG; in Envoy, BoringSSL's `RAND_bytes`.
    #[link_name = "random_get"]
    fn wasi_random_get(buf: i32, len: i32) -> i32;
}

/// Fills `buf` with random bytes; false when the host refused.
pub fn random(buf: &mut [u8]) -> bool {
    let Ok(len) = i32::try_from(buf.len()) else { return false };
    // SAFETY: the host writes exactly `len` bytes at `buf`, which we own mutably.
    unsafe { wasi_random_get(buf.as_mut_ptr() as i32, len) == 0 }
}

/// A stream property by path; absent, unreadable or refused: `None`.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

pub fn call_response_header(name: &str) -> Option<String> {
    header(MapType::HttpCallResponseHeaders, name)
}

fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    match hostcalls::get_buffer(kind, 0, size) {
        Ok(Some(b)) => b,
        _ => Vec::new(),
    }
}

pub fn request_body(size: usize) -> Vec<u8> {
    buffer(BufferType::HttpRequestBody, size)
}

pub fn call_response_body(size: usize) -> Vec<u8> {
    buffer(BufferType::HttpCallResponseBody, size)
}

pub fn plugin_configuration() -> Vec<u8> {
    buffer(BufferType::PluginConfiguration, usize::MAX)
}

pub fn send_reply(status: u32, headers: &[(String, String)], body: &[u8]) -> Result<(), Status> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hostcalls::send_http_response(status, headers, Some(body))
}

pub fn dispatch(cluster: &str, headers: &[(String, String)], body: &[u8], timeout_ms: u64) -> Result<u32, Status> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    hostcalls::dispatch_http_call(cluster, headers, Some(body), vec![], Duration::from_millis(timeout_ms))
}

pub fn log(level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Info => HostLevel::Info,
        LogLevel::Warn => HostLevel::Warn,
        LogLevel::Error => HostLevel::Error,
    };
    let _ = hostcalls::log(level, message);
}

pub fn define_counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

pub fn define_gauge(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Gauge, name).ok()
}

pub fn define_histogram(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Histogram, name).ok()
}

pub fn increment(id: u32, by: u64) {
    let _ = hostcalls::increment_metric(id, by.min(i64::MAX as u64) as i64);
}

pub fn record(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

pub fn set_tick(period: Duration) {
    let _ = hostcalls::set_tick_period(period);
}

pub fn shared_get(key: &str) -> Option<Vec<u8>> {
    match hostcalls::get_shared_data(key) {
        Ok((Some(v), _)) if !v.is_empty() => Some(v),
        _ => None,
    }
}

pub fn shared_get_cas(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((value, cas)) => (value.filter(|v| !v.is_empty()), cas),
        Err(_) => (None, None),
    }
}

/// Sets a shared-data value if it is still at version `cas`; false when it changed or the
/// host refused.
pub fn shared_set_cas(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    hostcalls::set_shared_data(key, Some(value), cas).is_ok()
}

/// Sets a shared-data value; false when the host refused.
pub fn shared_set(key: &str, value: &[u8]) -> bool {
    hostcalls::set_shared_data(key, Some(value), None).is_ok()
}

// The calls a streamed request needs. The SDK's wrappers of these panic on any status but Ok
// (a header map that is gone, a buffer that is not there): declared here again, so that a
// refusal is a `false` for the driver, never a VM trap.
#[link(wasm_import_module = "env")]
#[allow(clashing_extern_declarations)]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key: *const u8, key_len: usize) -> u32;
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, data: *const u8, len: usize) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_len: usize, queue_id: *mut u32) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, data: *const u8, len: usize) -> u32;
    fn proxy_dequeue_shared_queue(queue_id: u32, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_len: usize,
        args: *const u8,
        args_len: usize,
        results: *mut *mut u8,
        results_len: *mut usize,
    ) -> u32;
}

const OK: u32 = Status::Ok as u32;

/// The names in a header map (values are not needed); empty when the map is not there.
fn header_names(map: MapType) -> Vec<String> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host allocates `size` bytes with this module's allocator and hands them over.
    let serialized = unsafe {
        if proxy_get_header_map_pairs(map as u32, &mut data, &mut size) != OK || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    };
    parse_names(&serialized).unwrap_or_default()
}

/// Reads the host's map layout: a count, then per pair the key's and value's lengths (u32,
/// little-endian), then each key and value followed by a NUL. `None` when it does not add up.
fn parse_names(b: &[u8]) -> Option<Vec<String>> {
    let u32_at = |at: usize| -> Option<usize> {
        let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes) as usize)
    };
    let count = u32_at(0)?;
    let mut lengths = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let at = 4usize.checked_add(i.checked_mul(8)?)?;
        lengths.push((u32_at(at)?, u32_at(at.checked_add(4)?)?));
    }
    let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut names = Vec::with_capacity(lengths.len());
    for (key_len, value_len) in lengths {
        let key = b.get(at..at.checked_add(key_len)?)?;
        names.push(String::from_utf8_lossy(key).into_owned());
        at = at.checked_add(key_len)?.checked_add(1)?.checked_add(value_len)?.checked_add(1)?;
    }
    Some(names)
}

fn set_header(map: MapType, name: &str, value: Option<&str>) -> bool {
    // SAFETY: pointers and lengths of live slices; the host copies them.
    unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), v.as_ptr(), v.len()) == OK,
            None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) == OK,
        }
    }
}

/// Replaces the first `len` bytes of a body buffer (all the current callback holds) with `body`.
fn set_body(buffer: BufferType, len: usize, body: &[u8]) -> bool {
    // SAFETY: a pointer and length of a live slice; the host copies it.
    unsafe { proxy_set_buffer_bytes(buffer as u32, 0, len, body.as_ptr(), body.len()) == OK }
}

/// The request on its way upstream: every client header but pseudo-headers and `keep` goes,
/// `set` is set, the body replaced.
pub fn forward_request(set: &[(String, String)], keep: &[&str], body_len: usize, body: &[u8]) -> bool {
    let mut ok = true;
    for name in header_names(MapType::HttpRequestHeaders) {
        if !name.starts_with(':') && !keep.contains(&name.as_str()) {
            ok &= set_header(MapType::HttpRequestHeaders, &name, None);
        }
    }
    for (name, value) in set {
        ok &= set_header(MapType::HttpRequestHeaders, name, Some(value));
    }
    // The route was picked already if anything read it (the profile comes from route
    // metadata): pick it again for the new path, authority and upstream header.
    ok &= clear_route_cache();
    ok && set_body(BufferType::HttpRequestBody, body_len, body)
}

/// Envoy's foreign function `clear_route_cache`: the route is picked again on its next use.
fn clear_route_cache() -> bool {
    let name = "clear_route_cache";
    let mut results: *mut u8 = std::ptr::null_mut();
    let mut results_len: usize = 0;
    // SAFETY: pointers and lengths of live values; a result the host allocates is taken back.
    unsafe {
        let status =
            proxy_call_foreign_function(name.as_ptr(), name.len(), std::ptr::null(), 0, &mut results, &mut results_len);
        if !results.is_null() {
            drop(Vec::from_raw_parts(results, results_len, results_len));
        }
        status == OK
    }
}

pub fn resume_request() -> bool {
    // SAFETY: no pointers.
    unsafe { proxy_continue_stream(proxy_wasm::types::StreamType::HttpRequest as u32) == OK }
}

/// Resets the response (Envoy: the encoder's `resetStream`, after this callback).
pub fn reset_response() {
    // SAFETY: no pointers.
    unsafe { proxy_close_stream(proxy_wasm::types::StreamType::HttpResponse as u32) };
}

pub fn response_header(name: &str) -> Option<String> {
    header(MapType::HttpResponseHeaders, name)
}

pub fn set_response_header(name: &str, value: Option<&str>) -> bool {
    set_header(MapType::HttpResponseHeaders, name, value)
}

pub fn response_body(size: usize) -> Vec<u8> {
    buffer(BufferType::HttpResponseBody, size)
}

pub fn set_response_body(len: usize, body: &[u8]) -> bool {
    set_body(BufferType::HttpResponseBody, len, body)
}

/// Registers a shared queue of this VM (its root gets `on_queue_ready`); `None` when refused.
pub fn register_queue(name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: a pointer and length of a live string, and a pointer to a local the host fills.
    let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

/// Puts one item on a queue (Envoy then runs the registering root's `on_queue_ready`).
pub fn enqueue(queue_id: u32, item: &[u8]) -> bool {
    // SAFETY: a pointer and length of a live slice; the host copies it.
    unsafe { proxy_enqueue_shared_queue(queue_id, item.as_ptr(), item.len()) == OK }
}

/// Takes every item off a queue.
pub fn drain(queue_id: u32) {
    for _ in 0..1024 {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: the host allocates `len` bytes with this module's allocator and hands them over.
        let status = unsafe { proxy_dequeue_shared_queue(queue_id, &mut data, &mut len) };
        if !data.is_null() {
            // SAFETY: as above; taken back and freed.
            drop(unsafe { Vec::from_raw_parts(data, len, len) });
        }
        if status != OK {
            return; // empty (or gone)
        }
    }
}
