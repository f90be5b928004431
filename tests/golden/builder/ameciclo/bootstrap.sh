#!/bin/sh
# kiln bootstrap (url delivery): verify the release bundle against its pin, install
# kiln-firstboot and its unit, start it. Runs once per instance from cloud-init's runcmd.
set -eu
umask 077
say() { echo "kiln-bootstrap: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }
tarball=/var/lib/kiln/bundle.tar.gz
pin=$(cat /etc/kiln/bundle.sha256) || die "no bundle pin at /etc/kiln/bundle.sha256"
verify() { printf '%s  %s\n' "$pin" "$1" | sha256sum -c --status -; }
mkdir -p /var/lib/kiln
chmod 0700 /etc/kiln/secrets
if [ -f "$tarball" ] && verify "$tarball"; then
  say "bundle already present and verified"
else
  url='https://ameciclokiln.blob.core.windows.net/kiln/bundle-a896f90c9017a75ba1ce90b02d8d7b2513ade707502ca3f2cdf8e9f0d1da5a52.tar.gz'
  say "fetching $url"
  rm -f "$tarball.partial"
  curl -fsSL --retry 30 --retry-delay 5 --retry-all-errors --connect-timeout 20 --max-time 900 \
    -o "$tarball.partial" "$url" || die "cannot download the bundle from $url"
  verify "$tarball.partial" || { rm -f "$tarball.partial"; die "bundle sha256 mismatch (expected $pin)"; }
  mv -f "$tarball.partial" "$tarball"
fi
say "bundle verified: sha256 $pin"
tmp=$(mktemp -d /var/lib/kiln/.bundle.XXXXXX)
tar -xzf "$tarball" -C "$tmp" --no-same-owner || die "cannot unpack $tarball"
(cd "$tmp" && sha256sum -c --quiet SHA256SUMS) || die "bundle files do not match their SHA256SUMS"
cmp -s "$tmp/plan.json" /etc/kiln/plan.json || die "the bundle's plan.json differs from /etc/kiln/plan.json"
chmod 0755 "$tmp"
rm -rf /var/lib/kiln/bundle
mv "$tmp" /var/lib/kiln/bundle
install -m 0755 /var/lib/kiln/bundle/kiln-firstboot /usr/local/sbin/kiln-firstboot.partial
mv -f /usr/local/sbin/kiln-firstboot.partial /usr/local/sbin/kiln-firstboot
install -m 0644 /var/lib/kiln/bundle/kiln-firstboot.service /etc/systemd/system/kiln-firstboot.service.partial
mv -f /etc/systemd/system/kiln-firstboot.service.partial /etc/systemd/system/kiln-firstboot.service
# On disk before the unit is enabled, and the enabling on disk before the daemon starts: a power
# loss or hard reset otherwise leaves an enabled unit whose file and binary are zero-length
# (measured in the VM chaos test: the node never came back).
sync
systemctl daemon-reload
systemctl enable kiln-firstboot.service
sync
# --no-block: the unit is ordered after network-online.target, which cloud-init's final stage
# may itself be part of; waiting here could deadlock the boot.
systemctl start --no-block kiln-firstboot.service
say "kiln-firstboot started"
# Done for this instance, on disk: the payload's bootcmd reruns an interrupted first boot's
# write_files and bootstrap until this holds the instance id.
cat /var/lib/cloud/data/instance-id > /var/lib/kiln/bootstrap.done.partial
sync
mv -f /var/lib/kiln/bootstrap.done.partial /var/lib/kiln/bootstrap.done
sync
