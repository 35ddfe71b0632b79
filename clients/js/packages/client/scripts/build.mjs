// Builds dist/: `tsc` (ESM + .d.ts) and esbuild's browser bundle dist/lockstep.browser.js
// (one minified ESM file, no bare imports: the msgpack loader is swapped for one that asks
// for the `msgpack` option). Output is deterministic: the demo embeds a committed copy and CI
// compares it with a rebuild.
import { execFileSync } from "node:child_process";
import { rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");

rmSync(join(pkg, "dist"), { recursive: true, force: true });
// `npm run build` puts the workspace's node_modules/.bin on PATH.
execFileSync("tsc", ["-p", join(pkg, "tsconfig.json")], { stdio: "inherit", cwd: pkg });

const esbuild = await import("esbuild");
const browserMsgpack = {
  name: "browser-msgpack",
  setup(build) {
    build.onResolve({ filter: /\/msgpack-default\.js$/ }, (args) => ({
      path: join(args.resolveDir, "msgpack-default.browser.ts"),
    }));
  },
};
const result = await esbuild.build({
  entryPoints: [join(pkg, "src/index.ts")],
  outfile: join(pkg, "dist/lockstep.browser.js"),
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2020",
  minify: true,
  legalComments: "none",
  external: ["@msgpack/msgpack"],
  plugins: [browserMsgpack],
  metafile: true,
  logLevel: "warning",
});
const inputs = Object.keys(result.metafile.inputs);
if (inputs.some((p) => p.includes("node_modules"))) {
  console.error("browser bundle pulled in a dependency:", inputs.filter((p) => p.includes("node_modules")));
  process.exit(1);
}
