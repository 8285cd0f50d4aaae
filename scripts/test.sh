#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the Debian tools the fixtures
# need, checks formatting and lints, builds the binaries, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build binaries"
cargo build --workspace --bins
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
