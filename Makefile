# policyd — the two set-up commands are `make run` and `make test`.
GO       ?= go
BIN      := bin/policyd
VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: build run test deps lint bench clean

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

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./rules/... ./postfixpolicy/ ./store/...

clean:
	rm -rf bin
