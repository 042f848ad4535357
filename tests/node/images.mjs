#!/usr/bin/env node
// The official OpenAI Node SDK (the `openai` package pinned in package.json) as a client of the
// gateway, for the end-to-end tests (tests/test_node_sdk.py).
//
// Usage: node tests/node/images.mjs '<job JSON>'    (or the job on stdin)
//
// A job:
//   {
//     "baseURL": "http://127.0.0.1:PORT/v1",
//     "op": "generate" | "edit" | "generate_stream" | "edit_stream",
//     "params": {...},                 // passed to client.images.generate / client.images.edit
//     "files": [{"path": "a.png", "name": "a.png", "type": "image/png"}, ...],   // edit: `image`
//     "mask": {"path": "m.png", "name": "m.png", "type": "image/png"},         // edit, optional
//     "single": false,                 // edit with one file: send `image` instead of `image[]`
//     "timeout": 60000                 // ms
//   }
// A file is {path} or {b64} (its bytes in base64), with an optional `name` (default: the
// path's base name, or "image") and `type` (default: none, which the SDK sends as
// application/octet-stream).
//
// How the SDK sends an edit (openai 6.x, internal/uploads): a multipart/form-data body built
// with the global FormData; an array value is sent as repeated parts named `key[]` in array
// order (so `image: [a, b]` is two `image[]` parts), a lone file as `image`, every other field
// as a text part (numbers and booleans as strings), each file part with its `filename` and
// its File's type as `Content-Type`.
//
// Prints one JSON object on stdout and exits 0:
//   {"ok": true, "result": <what the SDK returned>, "status": 200, "headers": {...}}
//   {"ok": false, "error": {"name", "status", "code", "type", "param", "message", "headers"}}
// (with `stream: true` in params, `result` is {"events": [...]}, every event the SDK yielded).
// A bad job or anything that is not an API error exits 2 with a message on stderr.
//
// Streams (`generate_stream`, `edit_stream`: the same jobs, sent with `stream: true`). The SDK
// returns a Stream, an async iterable of the events (openai 6.x, core/streaming: SSE parsed
// with the `data:` of each event read as JSON; an event whose data holds `error`, as our
// `event: error` does, makes the iteration throw APIError with no status, and the error's
// code, param and type). Each event is summed up, the image not copied:
//   {"type", "partial_image_index", "size", "output_format", "quality", "background",
//    "created_at", "usage", "b64_len", "head_hex" (the first 16 bytes of the image, in hex),
//    "sha256" (of the image's bytes), "ms" (when the SDK yielded it, counted from just before
//    the SDK call; for an edit that includes reading its files)}
// and the answer is
//   {"ok": true, "status": 200, "headers": {...}, "response_ms": <when the headers came>,
//    "events": [...], "end_ms": <when the stream ended>}
//   {"ok": false, "error": {..., "ms"}, "events": []}                  refused before the stream
//   {"ok": false, "status": 200, "headers", "response_ms", "error": {..., "ms"},
//    "events": [... those before the error]}                           failed in the middle
// An error before the stream (a JSON error answer) is the SDK's error for its status; one in
// the middle (an `error` event) is an APIError with `status: null`. Anything
// else thrown while the stream is read (a cut connection: undici's TypeError `terminated`)
// is also `ok: false`, with `error.name` that error's name, `error.status` null, and
// `error.cause` the underlying error's message, since a cut stream is a case the tests ask for.

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import OpenAI, { APIError, toFile } from 'openai';

async function readJob() {
  if (process.argv[2]) {
    return JSON.parse(process.argv[2]);
  }
  const chunks = [];
  for await (const chunk of process.stdin) {
    chunks.push(chunk);
  }
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

async function upload(file) {
  if (!file || (file.path === undefined && file.b64 === undefined)) {
    throw new Error('a file needs `path` or `b64`');
  }
  const bytes = file.path !== undefined ? await readFile(file.path) : Buffer.from(file.b64, 'base64');
  const name = file.name ?? (file.path !== undefined ? basename(file.path) : 'image');
  return toFile(bytes, name, file.type ? { type: file.type } : undefined);
}

function headersOf(headers) {
  return headers ? Object.fromEntries(headers.entries()) : {};
}

function createClient(job) {
  return new OpenAI({
    baseURL: job.baseURL,
    apiKey: 'unused',
    maxRetries: 0,
    timeout: job.timeout ?? 60000,
  });
}

// The SDK call of a job: {call}, the APIPromise, wrapped so that awaiting this function does
// not await the call itself (an APIPromise is a thenable).
async function call(client, op, params, job) {
  if (op === 'generate') {
    return { call: client.images.generate(params) };
  }
  if (op === 'edit') {
    const files = await Promise.all((job.files ?? []).map(upload));
    params.image = job.single && files.length === 1 ? files[0] : files;
    if (job.mask) {
      params.mask = await upload(job.mask);
    }
    return { call: client.images.edit(params) };
  }
  throw new Error(`unknown op ${JSON.stringify(job.op)}: use "generate", "edit", "generate_stream" or "edit_stream"`);
}

async function run(job) {
  const client = createClient(job);
  const params = { ...(job.params ?? {}) };
  const { data, response } = await (await call(client, job.op, params, job)).call.withResponse();
  let result = data;
  if (params.stream) {
    const events = [];
    for await (const event of data) {
      events.push(event);
    }
    result = { events };
  }
  return { ok: true, result, status: response.status, headers: headersOf(response.headers) };
}

function hexHead(b64, bytes = 16) {
  if (typeof b64 !== 'string') {
    return null;
  }
  // 16 bytes are the first 24 base64 characters (whole 3-byte groups).
  return Buffer.from(b64.slice(0, Math.ceil(bytes / 3) * 4), 'base64').subarray(0, bytes).toString('hex');
}

function summary(event, ms) {
  return {
    type: event.type ?? null,
    partial_image_index: event.partial_image_index ?? null,
    size: event.size ?? null,
    output_format: event.output_format ?? null,
    quality: event.quality ?? null,
    background: event.background ?? null,
    created_at: event.created_at ?? null,
    usage: event.usage ?? null,
    b64_len: typeof event.b64_json === 'string' ? event.b64_json.length : null,
    head_hex: hexHead(event.b64_json),
    sha256: typeof event.b64_json === 'string'
      ? createHash('sha256').update(Buffer.from(event.b64_json, 'base64')).digest('hex') : null,
    ms,
  };
}

function apiErrorOf(e) {
  return {
    name: e.constructor.name,
    status: e.status ?? null,
    code: e.code ?? null,
    type: e.type ?? null,
    param: e.param ?? null,
    message: e.error?.message ?? e.message,
    headers: headersOf(e.headers),
  };
}

async function runStream(job) {
  const op = { generate_stream: 'generate', edit_stream: 'edit' }[job.op];
  const client = createClient(job);
  const params = { ...(job.params ?? {}), stream: true };
  const t0 = performance.now();
  const elapsed = () => Math.round(performance.now() - t0);
  const pending = (await call(client, op, params, job)).call;
  let data;
  let response;
  try {
    ({ data, response } = await pending.withResponse());
  } catch (e) {
    if (e instanceof APIError && e.status !== undefined) {
      return { ok: false, error: { ...apiErrorOf(e), ms: elapsed() }, events: [] };
    }
    throw e;
  }
  const out = { status: response.status, headers: headersOf(response.headers), response_ms: elapsed() };
  const events = [];
  try {
    for await (const event of data) {
      events.push(summary(event, elapsed()));
    }
  } catch (e) {
    const error = e instanceof APIError
      ? apiErrorOf(e)
      : { name: e?.name ?? 'Error', status: null, code: null, type: null, param: null, message: e?.message ?? String(e),
          cause: e?.cause?.message ?? e?.cause?.code ?? null, headers: {} };
    return { ...out, ok: false, error: { ...error, ms: elapsed() }, events };
  }
  return { ...out, ok: true, events, end_ms: elapsed() };
}

let job;
try {
  job = await readJob();
} catch (e) {
  process.stderr.write(`images.mjs: the job is not JSON: ${e.message}\n`);
  process.exit(2);
}
try {
  const streamed = job?.op === 'generate_stream' || job?.op === 'edit_stream';
  process.stdout.write(JSON.stringify(await (streamed ? runStream(job) : run(job))) + '\n');
} catch (e) {
  if (e instanceof APIError && e.status !== undefined) {
    process.stdout.write(JSON.stringify({ ok: false, error: apiErrorOf(e) }) + '\n');
  } else {
    process.stderr.write(`images.mjs: ${e?.stack ?? e}\n`);
    process.exit(2);
  }
}
