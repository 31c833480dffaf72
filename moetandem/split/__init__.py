"""End–cloud split execution: activation codec, route-aware scheduler, transport, cloud server, end runtime."""
