# Every target needs root on Debian 12; each installs what it needs first.
.PHONY: demo test deb

# The project working end to end: mod_md, pebble, the broker and the hook on loopback.
demo:
	./scripts/demo

# Every test tier.
test:
	./scripts/test

# The Debian package, left in dist/ (installs its build dependencies first).
deb:
	./scripts/build-deb
