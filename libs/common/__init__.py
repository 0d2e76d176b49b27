"""The shared language of Flockwatch: messages, topics, settings, configuration and the bus."""
