// Makes the heroku/go buildpack install Go on the dyno for code_exec_go
// (GO_INSTALL_TOOLS_IN_IMAGE=true keeps the toolchain in the slug); it builds
// only the stub below.
// +heroku install ./tools/gostub

module github.com/dynogate/dynogate

go 1.25
