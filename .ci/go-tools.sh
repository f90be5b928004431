#!/usr/bin/env bash
# Builds the real Go programs the tests run, from the Go module proxy, into caches keyed by
# module@version (a warm machine pays nothing; a new version is a new directory):
#   ~/.cache/kiln/go/tailscale.com@v1.102.3/{tailscale,tailscaled}   the client (VM tests'
#       mirror tarball, the host userspace test) and the operator chart source beside it in
#       the module cache
#   ~/.cache/kiln/go/headscale@v0.29.2/headscale                     the control server
#   ~/.cache/kiln/go/helm@v3.21.4/helm                                renders the operator chart
# Prints what each cost. Tests find them with kiln_testkit::gotools (same paths; KILN_GO_TOOLS
# overrides the root).
#
# Flags: CGO_ENABLED=0 (static, as Tailscale's own release builds are) and -buildvcs=false (a
# module build has no VCS to stamp; set here, not only in the machine's GOFLAGS).
set -euo pipefail

root="${KILN_GO_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/go}"
command -v go >/dev/null || { echo "go-tools: no \`go\` in PATH (Go >= 1.26.6 is needed)" >&2; exit 1; }
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

# build KEY PACKAGE@VERSION... : go install into $root/KEY unless every binary is there.
build() {
  local key=$1; shift
  local dir="$root/$key" missing=0 pkg
  for pkg in "$@"; do
    local bin=${pkg%@*}; bin=${bin##*/}
    [ -x "$dir/$bin" ] || missing=1
  done
  if [ "$missing" = 0 ]; then
    echo "go-tools: $key cached ($dir)"
    return
  fi
  local t0; t0=$(date +%s)
  mkdir -p "$dir.partial"
  GOBIN="$dir.partial" go install "$@"
  # Publish the directory whole, so an interrupted build never looks cached.
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  echo "go-tools: $key built in $(($(date +%s) - t0))s ($dir)"
}

# build_in_module KEY MODULE@VERSION ./PKG: the same build as `go install PKG@VERSION` (the
# module as main module, its own go.mod and go.sum), run inside the module's source in the
# module cache. For Headscale: `go install github.com/juanfont/headscale/cmd/headscale@v0.29.2`
# fails here with "loading deprecation for github.com/juanfont/headscale: ... reading
# https://proxy.golang.org/github.com/juanfont/headscale/@v/list: 403 Forbidden" (the proxy
# serves the version but not the module's version list, which go install reads to look for a
# deprecation notice); fetching the version itself works.
build_in_module() {
  local key=$1 mod=$2 pkg=$3
  local dir="$root/$key" bin=${pkg##*/}
  if [ -x "$dir/$bin" ]; then
    echo "go-tools: $key cached ($dir)"
    return
  fi
  local t0 src; t0=$(date +%s)
  src=$(go mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "go-tools: go mod download $mod gave no source dir" >&2; exit 1; }
  mkdir -p "$dir.partial"
  (cd "$src" && go build -o "$dir.partial/$bin" "$pkg")
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  echo "go-tools: $key built in $(($(date +%s) - t0))s ($dir)"
}

t0=$(date +%s)
build tailscale.com@v1.102.3 tailscale.com/cmd/tailscale@v1.102.3 tailscale.com/cmd/tailscaled@v1.102.3
build_in_module headscale@v0.29.2 github.com/juanfont/headscale@v0.29.2 ./cmd/headscale
build helm@v3.21.4 helm.sh/helm/v3/cmd/helm@v3.21.4
# The operator chart source is read from the module cache: make sure it is there even when
# the binaries came from a copied cache.
go mod download tailscale.com@v1.102.3
echo "go-tools: total $(($(date +%s) - t0))s"
