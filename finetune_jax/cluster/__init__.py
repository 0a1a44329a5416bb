"""The cluster: device mesh and sharding rules, multi-host start-up, launch command builders."""
