# capnet: `make demo` and `make test` do all set-up on a fresh Debian machine (as root).

CARGO ?= cargo
# Debian packages the build, the tests, the demo and the benchmarks use.
DEB_PACKAGES := capnproto libcapnp-dev libseccomp-dev pkg-config \
	nginx python3 python3-aiosmtpd microsocks bubblewrap iperf3 socat curl ca-certificates \
	iproute2 openssl

.PHONY: all deps build demo test lint bench clean

all: build

# Installs whatever Debian packages are missing (nothing if all are present).
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "make: installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "make: run as root to install packages" >&2; exit 1; fi; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "make: cargo not found: install Rust (rustup.rs)" >&2; exit 1; }

build: deps
	$(CARGO) build --workspace

demo: build
	./target/debug/capnet-demo --config config/demo.toml

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint build
	$(CARGO) test --workspace

# Long measurements (throughput, latency, spawn time) against real peers; writes
# docs/benchmarks.md.
bench: deps
	$(CARGO) build --workspace --release
	./target/release/capnet-bench --out docs/benchmarks.md

clean:
	$(CARGO) clean
