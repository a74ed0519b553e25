fn main() -> anyhow::Result<()> {
    dynogate_gateway::main()
}
