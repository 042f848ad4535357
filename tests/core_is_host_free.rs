//! The core never names proxy-wasm: only `src/host/` (compiled for wasm alone) may. This keeps
//! every decision reachable by `cargo test` (docs/architecture.md).

#[test]
fn only_the_glue_names_proxy_wasm() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("readable");
            assert!(!text.contains("proxy_wasm"), "{} names proxy_wasm: move that into src/host/", path.display());
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} files checked");
}
