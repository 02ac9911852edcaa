"""Machine assembly: the x86 map in one table, config, builder and run loop."""
