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
