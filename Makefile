# policyd — the two set-up commands are `make run` and `make test`.
GO       ?= go
BIN      := bin/policyd
VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: build run test deps lint bench bench-mta soak clean fuzz

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/policyd

# The daemon on the embedded store with the built-in chain (or ./config).
run: build
	./$(BIN) serve

deps:
	./scripts/install-deps.sh

# Everything, for real: Postfix and Redis are started by the tests.
test: deps lint
	$(GO) test -race -count=1 ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

# The go-test benchmarks of the engine, the policy front-end and the
# store, then policyd under load against the no-op baselines (both
# protocols, embedded store and Redis), written to docs/benchmarks.md.
# BENCH_DURATION (default 5s) is the length of each of the ~26 runs.
bench:
	$(GO) test -p 1 -run '^$$' -bench . -benchmem ./rules/... ./postfixpolicy/ ./store/... ./milter/
	GO=$(GO) ./scripts/bench.sh

# Mixed load on policyd with Redis, Redis restarted midway; reports RSS,
# goroutines and descriptors. SOAK_DURATION defaults to 10m.
# policyd through a real private Postfix (smtp-source -s 16), as a policy
# server and as a milter, against no-op servers of each protocol.
bench-mta:
	$(GO) test -run '^$$' -bench '^BenchmarkMTA$$' -benchtime 1x -timeout 20m ./internal/benchmta/

soak:
	GO=$(GO) ./scripts/soak.sh

# Every native fuzz target in the module, one after another, FUZZTIME
# each: go test fuzzes one target of one package per run. Their committed
# seed corpora (testdata/fuzz/<FuzzName>/) also run in make test.
FUZZTIME ?= 30s
fuzz:
	@set -e; pkgs=$$($(GO) list -f '{{.ImportPath}} {{.Dir}}' ./...); \
	echo "$$pkgs" | while read -r pkg dir; do \
	  for fn in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$$dir"/*_test.go 2>/dev/null); do \
	    echo "== $$pkg $$fn ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) "$$pkg"; \
	  done; \
	done

clean:
	rm -rf bin
