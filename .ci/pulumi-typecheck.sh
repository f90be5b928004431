#!/usr/bin/env bash
# Typechecks examples/pulumi (TypeScript, @pulumi/azure-native) with `tsc --noEmit` against the
# real npm packages pinned by its package-lock.json. node_modules lives in a cache directory
# keyed by the lock file's hash, so a warm run only runs tsc; the example directory gets a
# symlink to it (git-ignored). See examples/pulumi/README.md for the cost.
set -euo pipefail
cd "$(dirname "$0")/../examples/pulumi"
hash=$(sha256sum package-lock.json | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kiln/npm/pulumi-$hash"
if [ ! -e "$cache/.complete" ]; then
  rm -rf "$cache"
  mkdir -p "$cache"
  cp package.json package-lock.json "$cache/"
  # npm ci: exactly the lock file, or fail.
  npm ci --prefix "$cache" --no-audit --no-fund --loglevel=error
  touch "$cache/.complete"
fi
ln -sfn "$cache/node_modules" node_modules
"$cache/node_modules/.bin/tsc" --noEmit -p tsconfig.json
echo "examples/pulumi: tsc --noEmit ok (packages: $cache)"
