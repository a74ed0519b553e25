// Package main is a stub: the heroku/go buildpack needs a package to build,
// and dynogate needs only the Go toolchain it installs (see go.mod).
package main

func main() {}
