#!/usr/bin/env node
// The official OpenAI Node SDK (the `openai` package pinned in package.json) as a client of the
// gateway, for the end-to-end tests (tests/test_node_sdk.py).
//
// Usage: node tests/node/images.mjs '<job JSON>'    (or the job on stdin)
//
// A job:
//   {
//     "baseURL": "http://127.0.0.1:PORT/v1",
//     "op": "generate" | "edit",
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

async function run(job) {
  const client = new OpenAI({
    baseURL: job.baseURL,
    apiKey: 'unused',
    maxRetries: 0,
    timeout: job.timeout ?? 60000,
  });
  const params = { ...(job.params ?? {}) };
  let call;
  if (job.op === 'generate') {
    call = client.images.generate(params);
  } else if (job.op === 'edit') {
    const files = await Promise.all((job.files ?? []).map(upload));
    params.image = job.single && files.length === 1 ? files[0] : files;
    if (job.mask) {
      params.mask = await upload(job.mask);
    }
    call = client.images.edit(params);
  } else {
    throw new Error(`unknown op ${JSON.stringify(job.op)}: use "generate" or "edit"`);
  }
  const { data, response } = await call.withResponse();
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

let job;
try {
  job = await readJob();
} catch (e) {
  process.stderr.write(`images.mjs: the job is not JSON: ${e.message}\n`);
  process.exit(2);
}
try {
  process.stdout.write(JSON.stringify(await run(job)) + '\n');
} catch (e) {
  if (e instanceof APIError && e.status !== undefined) {
    const error = {
      name: e.constructor.name,
      status: e.status,
      code: e.code ?? null,
      type: e.type ?? null,
      param: e.param ?? null,
      message: e.error?.message ?? e.message,
      headers: headersOf(e.headers),
    };
    process.stdout.write(JSON.stringify({ ok: false, error }) + '\n');
  } else {
    process.stderr.write(`images.mjs: ${e?.stack ?? e}\n`);
    process.exit(2);
  }
}
