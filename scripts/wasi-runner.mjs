// Cargo runner for wasm32-wasip1 test binaries: runs them under Node's built-in WASI.
// Any import that is not WASI (the proxy-wasm host calls, `env.proxy_*`) is stubbed to return
// 0; the pure core under test never calls them. `_initialize` (exported by proxy_wasm::main!)
// is hidden so that wasi.start() runs the test harness's `_start`.
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process from "node:process";

const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: "preview1",
  args: [file, ...args],
  env: process.env,
  preopens: { ".": process.cwd() },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(file));
const imports = { wasi_snapshot_preview1: wasi.wasiImport };
for (const imp of WebAssembly.Module.imports(module)) {
  if (imp.module === "wasi_snapshot_preview1") continue;
  imports[imp.module] ??= {};
  if (imp.kind === "function") imports[imp.module][imp.name] = () => 0;
}
const instance = await WebAssembly.instantiate(module, imports);
const exports = { ...instance.exports };
delete exports._initialize;
process.exitCode = wasi.start({ exports });
