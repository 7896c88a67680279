"""Sans-I/O SMTP server protocol (imports nothing: the receiver pays per connection)."""
