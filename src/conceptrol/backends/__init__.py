"""What cannot be an attention processor, isolated (OminiControl's condition branch)."""
