#!/usr/bin/env bash
# Installs the optional Debian packages the embedded profile can use (the images install the same). Never fails
# the build: without the CJK font the procedural source falls back to Latin-only text; without FriBiDi Pillow
# lays text out with its basic engine instead of Raqm, and some text rows differ from the images'.
set -u
want=(fonts-wqy-microhei libfribidi0)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
    || echo "system-deps: could not install ${missing[*]} (text rows: no Chinese, or a basic layout)"
else
  echo "system-deps: ${missing[*]} not installed and no root/apt (text rows: no Chinese, or a basic layout)"
fi
exit 0
