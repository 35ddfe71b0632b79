// Size budget for the browser bundle: fails when gzip(dist/lockstep.browser.js) passes
// BUDGET. Run after `npm run build`.
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

// 8.7 KB at the first release; the headroom is for fixes, not for features that belong in another package.
const BUDGET = 11 * 1024;
const file = join(dirname(fileURLToPath(import.meta.url)), "..", "dist", "lockstep.browser.js");
const raw = readFileSync(file);
const gz = gzipSync(raw, { level: 9 }).length;
const line = `lockstep.browser.js: ${raw.length} B minified, ${gz} B gzip (budget ${BUDGET} B gzip)`;
if (gz > BUDGET) {
  console.error(`${line}: OVER BUDGET`);
  process.exit(1);
}
console.log(line);
