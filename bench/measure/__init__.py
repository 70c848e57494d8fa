"""Measurement conventions as pure functions, apart from any process or collective: step-time statistics over
ranks (`stats`), the row's measured fields (`rows`), model FLOPs (`flops`), the MFU peak table (`mfu`), the
bytes a rank holds (`memory`), parity against one device (`parity`), collective bandwidths (`bandwidth`)."""
