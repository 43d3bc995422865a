pytest_plugins = ["tests.fixtures_postgres", "tests.fixtures_kinesis"]
