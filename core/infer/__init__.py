"""Inference: daily SMB of glaciers over their study years, streamed into CF NetCDF files."""
