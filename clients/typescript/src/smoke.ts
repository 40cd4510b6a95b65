// Uses the generated client (src/generated, from `npm run generate`) against a running service and
// prints what it got as one JSON object on stdout; tests/test_typescript_client.py checks it.
//
//   node dist/smoke.js <base URL> <image> <other image> <non-image file>
//
// Every answer is read through the generated types: CaptionResponse, BatchResponse, Label, ErrorResponse.
import { openAsBlob } from 'node:fs';
import { basename, extname } from 'node:path';

import { client } from './generated/client.gen.js';
import {
  createCaption,
  createCaptionsBatch,
  getModelInfo,
  type BatchItem,
  type BatchResponse,
  type CaptionItem,
  type CaptionResponse,
  type CreateCaptionErrors,
  type ErrorResponse,
  type Label,
} from './generated/index.js';

const MEDIA_TYPES: Record<string, string> = {
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.png': 'image/png',
  '.txt': 'text/plain',
};

/** The file at `path` as a File (a Blob with a name), typed by its extension. */
async function file(path: string): Promise<File> {
  const type = MEDIA_TYPES[extname(path).toLowerCase()] ?? 'application/octet-stream';
  return new File([await openAsBlob(path)], basename(path), { type });
}

function caption(c: CaptionItem) {
  return { text: c.text, tokens: c.tokens, score: c.score, normalized_score: c.normalized_score };
}

function label(l: Label) {
  return { name: l.name, class_id: l.class_id, probability: l.probability };
}

/** One image's answer. A new field of CaptionResponse is one more line here. */
function captionResult(r: CaptionResponse) {
  return {
    captions: r.captions.map(caption),
    labels: r.labels ? r.labels.map(label) : null,
    settings: r.settings,
    model: r.model,
    request_id: r.request_id,
  };
}

/** One file of a batch: captions, or its own error. A new field of BatchItem is one more line here. */
function batchItem(item: BatchItem) {
  return {
    index: item.index,
    filename: item.filename ?? null,
    captions: item.captions ? item.captions.map(caption) : null,
    labels: item.labels ? item.labels.map(label) : null,
    error: item.error ? { code: item.error.code, message: item.error.message } : null,
  };
}

function batchResult(r: BatchResponse) {
  return { results: r.results.map(batchItem), settings: r.settings, model: r.model, request_id: r.request_id };
}

/** A 4xx answer: the status, the X-Request-ID header and the typed error body. */
function errorResult(response: Response, body: ErrorResponse) {
  return {
    status: response.status,
    request_id_header: response.headers.get('x-request-id'),
    code: body.error.code,
    message: body.error.message,
    request_id: body.error.request_id,
    details: body.error.details ?? null,
  };
}

async function main(): Promise<void> {
  const [baseUrl, imagePath, otherImagePath, notImagePath] = process.argv.slice(2);
  if (!baseUrl || !imagePath || !otherImagePath || !notImagePath) {
    throw new Error('usage: node dist/smoke.js <base URL> <image> <other image> <non-image file>');
  }
  client.setConfig({ baseUrl });

  // One image, sent as a plain Blob (no file name), with its two best ImageNet labels.
  const image = await file(imagePath);
  const one = await createCaption({
    body: { image: new Blob([image], { type: image.type }) },
    query: { strategy: 'beam', num_captions: 2, labels: 2 },
  });
  if (one.error !== undefined) {
    throw new Error(`POST /v1/captions answered ${one.response.status}: ${JSON.stringify(one.error)}`);
  }
  const single = { status: one.response.status, ...captionResult(one.data) };

  // A batch: two images and a text file, which gets its own error entry in a 200 answer (the
  // service's default number of labels per image).
  const many = await createCaptionsBatch({
    body: { images: [image, await file(notImagePath), await file(otherImagePath)] },
    query: { max_length: 8 },
  });
  if (many.error !== undefined) {
    throw new Error(`POST /v1/captions/batch answered ${many.response.status}: ${JSON.stringify(many.error)}`);
  }
  const batch = { status: many.response.status, ...batchResult(many.data) };

  // 415: a text file where an image belongs; the body is the documented ErrorResponse.
  const notImage = await createCaption({
    body: { image: await file(notImagePath) },
    headers: { 'X-Request-ID': 'ts-client-415' },
  });
  if (notImage.error === undefined) {
    throw new Error(`a text upload was captioned (${notImage.response.status})`);
  }
  const unsupported: CreateCaptionErrors[415] = notImage.error;

  // 422: a decoding setting out of range.
  const badQuery = await createCaption({ body: { image }, query: { beam_size: 0 } });
  if (badQuery.error === undefined) {
    throw new Error(`beam_size=0 was accepted (${badQuery.response.status})`);
  }
  const invalid: CreateCaptionErrors[422] = badQuery.error;

  const info = await getModelInfo({ throwOnError: true });

  const out = {
    single,
    batch,
    unsupported_media_type: errorResult(notImage.response, unsupported),
    invalid_parameter: errorResult(badQuery.response, invalid),
    model: {
      name: info.data.name,
      version: info.data.version,
      labels: info.data.labels,
      default_labels: info.data.default_labels,
      max_batch_files: info.data.limits.max_batch_files,
    },
  };
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? (err.stack ?? err.message) : err);
  process.exit(1);
});
