#!/usr/bin/env python3
# Builds the test artifact mirror (contract stand-ins for K3s and Tailscale, the real pinned
# Argo CD install.yaml) in the layout kiln's profiles map a `mirror:` URL to:
#   OUTDIR/k3s/v1.32.4+k3s1/k3s                  the K3s contract stand-in (0755)
#   OUTDIR/k3s/v1.32.4+k3s1/sha256sum-amd64.txt  `<sha256>  k3s`, as the release publishes it
#   OUTDIR/tailscale/tailscale_1.102.3_amd64.tgz the static-tarball layout with the stand-ins
#                                                (host `--root` tests), or with --real-tailscale
#                                                the real v1.102.3 binaries (VM tests)
#   OUTDIR/tailscale/tailscale_1.102.3_amd64.tgz.sha256  its hex sha256, as pkgs.tailscale.com
#                                                publishes one beside each tarball (`kiln lock`)
#   OUTDIR/argocd/v3.4.7/install.yaml            upstream, byte-for-byte (tests/upstream/)
#   OUTDIR/pins.json                             name, mirror path, sha256, sha512 and size of
#                                                each artifact
# Deterministic: same inputs, same bytes (fixed tar mtimes/owners/order, gzip mtime 0), so the
# pins in profiles/qemu-local.yaml and tests/standins/pins.json stay valid until a stand-in
# changes (a test fails when they drift).
#
# Usage: make-mirror.py [--real-tailscale BINDIR MODDIR] OUTDIR   (prints pins.json as well)
#   BINDIR holds `tailscale` and `tailscaled` built from tailscale.com@v1.102.3 (.ci/go-tools.sh),
#   MODDIR is that module's source (`$(go env GOMODCACHE)/tailscale.com@v1.102.3`), whose
#   cmd/tailscaled/ holds the systemd files the release tarball carries. The tarball then has
#   the members, order, modes and owners of release/dist/unixpkgs (tgzTarget.Build) in that
#   module; its mtimes are fixed, so the same binaries give the same bytes.

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
K3S_TAG = "v1.32.4+k3s1"
TS_VERSION = "1.102.3"
ARGOCD_TAG = "v3.4.7"
MTIME = 1735689600  # 2025-01-01T00:00:00Z


def read(path):
    with open(path, "rb") as f:
        return f.read()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def standin_entries():
    top = "tailscale_%s_amd64" % TS_VERSION
    return [
        (top + "/", None, 0o755),
        (top + "/systemd/", None, 0o755),
        (top + "/systemd/tailscaled.defaults", read(os.path.join(HERE, "tailscale-systemd/tailscaled.defaults")), 0o644),
        (top + "/systemd/tailscaled.service", read(os.path.join(HERE, "tailscale-systemd/tailscaled.service")), 0o644),
        (top + "/tailscale", read(os.path.join(HERE, "tailscale")), 0o755),
        (top + "/tailscaled", read(os.path.join(HERE, "tailscaled")), 0o755),
    ]


def real_entries(bindir, moddir):
    """The release tarball's members in release/dist/unixpkgs' order."""
    top = "tailscale_%s_amd64" % TS_VERSION
    unit_dir = os.path.join(moddir, "cmd/tailscaled")
    entries = [
        (top + "/", None, 0o755),
        (top + "/tailscaled", read(os.path.join(bindir, "tailscaled")), 0o755),
        (top + "/tailscale", read(os.path.join(bindir, "tailscale")), 0o755),
        (top + "/systemd/", None, 0o755),
    ]
    for name in ["tailscaled.service", "tailscaled.defaults", "tailscale-online.target",
                 "tailscale-wait-online.service"]:
        entries.append((top + "/systemd/" + name, read(os.path.join(unit_dir, name)), 0o644))
    return entries


def tailscale_tgz(entries, level=9):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, mode in entries:
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, mode, 0, 0, "root", "root"
            if data is None:
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            else:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=level) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def main():
    args = sys.argv[1:]
    entries = None
    if args[:1] == ["--real-tailscale"] and len(args) == 4:
        entries = real_entries(args[1], args[2])
        args = args[3:]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: make-mirror.py [--real-tailscale BINDIR MODDIR] OUTDIR")
    out = args[0]
    k3s = read(os.path.join(HERE, "k3s"))
    sums = ("%s  k3s\n" % sha(k3s)).encode()
    # The real binaries are ~76 MB: level 6 costs half of 9's CPU for the same size within 1%.
    tgz = tailscale_tgz(entries, 6) if entries is not None else tailscale_tgz(standin_entries())
    install = read(os.path.join(REPO, "tests/upstream/argo-cd-%s/install.yaml" % ARGOCD_TAG))
    files = {
        "k3s": ("k3s/%s/k3s" % K3S_TAG, k3s, 0o755),
        "k3s-checksums": ("k3s/%s/sha256sum-amd64.txt" % K3S_TAG, sums, 0o644),
        "tailscale": ("tailscale/tailscale_%s_amd64.tgz" % TS_VERSION, tgz, 0o644),
        "argocd": ("argocd/%s/install.yaml" % ARGOCD_TAG, install, 0o644),
        "tailscale-sha256": ("tailscale/tailscale_%s_amd64.tgz.sha256" % TS_VERSION,
                             sha(tgz).encode(), 0o644),
    }
    pins = {}
    for key, (rel, data, mode) in files.items():
        write(os.path.join(out, rel), data, mode)
        pins[key] = {"path": rel, "url-path": rel.replace("+", "%2B"), "sha256": sha(data),
                     "sha512": hashlib.sha512(data).hexdigest(), "size": len(data)}
    text = json.dumps(pins, indent=2, sort_keys=True) + "\n"
    write(os.path.join(out, "pins.json"), text.encode())
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
