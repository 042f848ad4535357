//! Replays every fuzz corpus and regression input (fuzz/corpus/<target>, fuzz/regressions/<target>)
//! through the fuzz targets' checks on stable Rust, so `cargo test` keeps every finding fixed.
include!("../fuzz/checks.rs");

fn replay(target: &str, check: fn(&[u8])) {
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&path) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).expect("readable");
            check(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no corpus for {target}");
}

#[test]
fn request_parser_corpus() {
    replay("request_parser", check_request_parser);
}

#[test]
fn gemini_reader_corpus() {
    replay("gemini_reader", check_gemini_reader);
}

#[test]
fn entry_decoder_corpus() {
    replay("entry_decoder", check_entry_decoder);
}

#[test]
fn l2_response_corpus() {
    replay("l2_response", check_l2_response);
}

#[test]
fn config_corpus() {
    replay("config", check_config);
}

#[test]
fn multipart_corpus() {
    replay("multipart", check_multipart);
}

#[test]
fn files_corpus() {
    replay("files", check_files);
}

#[test]
fn flight_corpus() {
    replay("flight", check_flight);
}

#[test]
fn stream_corpus() {
    replay("stream", check_stream);
}
