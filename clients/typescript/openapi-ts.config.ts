// @hey-api/openapi-ts settings: `npm run generate` (or `npx openapi-ts`) writes the client to
// src/generated from CAPTIONER_OPENAPI (a URL or a file; default: a local server's /openapi.json).
import { defineConfig } from '@hey-api/openapi-ts';

export default defineConfig({
  input: process.env.CAPTIONER_OPENAPI ?? 'http://localhost:8000/openapi.json',
  output: { path: 'src/generated' },
  plugins: ['@hey-api/client-fetch', '@hey-api/typescript', '@hey-api/sdk'],
});
