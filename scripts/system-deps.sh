#!/usr/bin/env bash
# Installs the optional Debian packages the embedded profile can use. Never fails the build:
# without them the procedural source falls back to Latin-only text.
set -u
want=(fonts-wqy-microhei)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
    || echo "system-deps: could not install ${missing[*]} (Chinese text rows will be skipped)"
else
  echo "system-deps: ${missing[*]} not installed and no root/apt (Chinese text rows will be skipped)"
fi
exit 0
