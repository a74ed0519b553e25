fn main() -> anyhow::Result<()> {
    dynogate_runner::main()
}
