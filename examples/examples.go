// Package examples holds example configuration. Its default/ directory is
// also the built-in chain policyd runs without a configuration directory
// (rules.Builtin embeds it from here, so the example and the built-in
// chain cannot drift apart).
package examples

import "embed"

// Default is default/: plugins and the files of the rules it lists.
//
//go:embed default
var Default embed.FS
