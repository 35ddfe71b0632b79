#!/usr/bin/env node
// The Yjs benchmark driver (issue 11). One scenario per run, its result as one JSON line on
// stdout; loadtest/yjs.sh starts the servers and calls it. See loadtest/yjs/README.md.
//
//   node loadtest/yjs/driver.mjs latency --urls http://a,http://b --secret S --docs 5 …
//   node loadtest/yjs/driver.mjs memory  --url http://a --secret S --docs 1000 --pid P …
//   node loadtest/yjs/driver.mjs build   --url http://a --secret S --doc big:1 --target-bytes N --out F
//   node loadtest/yjs/driver.mjs join    --url http://a --secret S --doc big:1 --expect-chars N
//   node loadtest/yjs/driver.mjs genlog  --doc log:1 --entries 50000 --out F
import { BUILD_DEFAULTS, JOIN_DEFAULTS, LOG_DEFAULTS, MEMORY_DEFAULTS, build, genLog, join, memory } from './docs.mjs';
import { LATENCY_DEFAULTS, latency } from './latency.mjs';
import { parseArgs } from './proto.mjs';

const scenarios = {
  latency: [LATENCY_DEFAULTS, latency],
  memory: [MEMORY_DEFAULTS, memory],
  build: [BUILD_DEFAULTS, build],
  join: [JOIN_DEFAULTS, join],
  genlog: [LOG_DEFAULTS, genLog],
};

const [name, ...rest] = process.argv.slice(2);
if (!scenarios[name]) {
  console.error(`usage: driver.mjs ${Object.keys(scenarios).join('|')} [--option value …]`);
  process.exit(2);
}
const [defaults, run] = scenarios[name];
try {
  const result = await run(parseArgs(rest, defaults));
  console.log(JSON.stringify(result));
  process.exit(0);
} catch (e) {
  console.error(`${name} failed: ${e.stack ?? e}`);
  process.exit(1);
}
