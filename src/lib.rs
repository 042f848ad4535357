//! gemini-image-filter: the OpenAI Images API on Gemini 3 Pro Image, as an Envoy proxy-wasm
//! filter.
//!
//! Everything but `host` is a pure core that knows nothing of proxy-wasm and is tested
//! natively (and on wasm32-wasip1 under Node's WASI). `host` is the thin glue that turns the
//! core's effects into host calls.

pub mod access_log;
pub mod backends;
pub mod base64;
pub mod cache;
pub mod config;
pub mod driver;
pub mod edit;
pub mod endpoint;
pub mod error;
pub mod exchange;
pub mod files;
pub mod flight;
pub mod gemini;
pub mod geometry;
pub mod hash;
pub mod hot;
pub mod image_type;
pub mod metrics;
pub mod model;
pub mod multipart;
pub mod named;
pub mod openai;
pub mod policy;
pub mod reader;
pub mod request;
pub mod safety;
pub mod stream;
#[cfg(test)]
mod test_support;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod host;
