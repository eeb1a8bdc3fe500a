#!/bin/sh
# apt-get install for the service images: Debian's security and point-release updates too (a
# database reachable from the workers must be the patched one), no recommends, no service started
# by a package's postinst during the build (policy-rc.d), nothing left of the lists and docs.
set -eu
. /etc/os-release
# The public Debian images list them already (deb822, sources.list.d); debootstrap's base does not.
grep -rqs -- "${VERSION_CODENAME}-security" /etc/apt/sources.list /etc/apt/sources.list.d/ || {
  echo "deb http://deb.debian.org/debian ${VERSION_CODENAME}-updates main"
  echo "deb http://deb.debian.org/debian-security ${VERSION_CODENAME}-security main"
} >>/etc/apt/sources.list
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends \
  -o Dpkg::Options::=--force-confold "$@"
apt-get clean
rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /usr/sbin/policy-rc.d
